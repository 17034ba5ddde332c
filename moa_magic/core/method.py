"""The Mixture-of-Agents method itself: how a later layer's messages are built.

Follows docs/moa-method.md, the specification (paper Table 1 and the authors' reference code), exactly.
Pure functions, no I/O, so the spec can be tested byte for byte.
"""

from __future__ import annotations

AGGREGATE_PROMPT = (
    "You have been provided with a set of responses from various open-source models to the latest "
    "user query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, recognizing "
    "that some of it may be biased or incorrect. Your response should not simply replicate the given "
    "answers but should offer a refined, accurate, and comprehensive reply to the instruction. "
    "Ensure your response is well-structured, coherent, and adheres to the highest standards of "
    "accuracy and reliability.\n\nResponses from models:"
)


def references_block(template: str, outputs: list[str]) -> str:
    """The aggregate-and-synthesize prompt followed by `1. <output>` lines, outputs stripped."""
    numbered = "".join(f"\n{i}. {text.strip()}" for i, text in enumerate(outputs, start=1))
    return template + numbered


def conversation(prompt: str, system: str | None = None, history=()) -> list[dict]:
    """The user's conversation as layer 1 sees it: optional system prompt, the earlier turns
    (`history`: user/assistant messages, each earlier answer being that turn's final aggregated
    answer, as in the authors' bot.py), then the new user turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.extend({"role": m["role"], "content": m["content"]} for m in history)
    messages.append({"role": "user", "content": prompt})
    return messages


def with_references(messages: list[dict], template: str, outputs: list[str]) -> list[dict]:
    """Messages for a call of layer i > 1: the references go into the system message.

    An existing leading system message gets the block appended after a blank line; otherwise a new
    system message is put first. User turns are never changed. Layer 1 (no outputs) is untouched.
    """
    if not outputs:
        return [dict(m) for m in messages]
    block = references_block(template, outputs)
    rest = [dict(m) for m in messages]
    if rest and rest[0].get("role") == "system":
        rest[0]["content"] = f"{rest[0]['content']}\n\n{block}"
        return rest
    return [{"role": "system", "content": block}, *rest]
