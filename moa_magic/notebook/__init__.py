"""The IPython face: the %%moa / %moa magics."""
