"""Everything a person sees: sanitizing, formatting, static renditions, terminal and widgets."""
