"""``summary.md``: the key numbers of an evaluation, for a reader and for the terminal.

The header describes the model; each evaluator writes its own section (its ``summarize``), since it
knows which of its numbers matter.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

__all__ = ["fmt", "model_lines", "compose"]


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for None, floats with ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_lines(model: Mapping[str, Any]) -> List[str]:
    """One line on the evaluated model: where it comes from, its tokenizer, sizes, state size and T_train."""
    step = "" if model.get("step") is None else f", step {model['step']:,}"
    return [
        f"Model: `{model['path']}` ({model['kind']}{step}), tokenizer {model['tokenizer']}, "
        f"{model['params']:,} parameters, state N_S = {model['state_size']:,} "
        f"({model['n_layer']} layers x {model['nheads']} heads x {model['headdim']} x {model['d_state']}), "
        f"T_train = {model['train_len']:,}.",
        "",
    ]


def compose(model: Optional[Mapping[str, Any]], sections: Sequence[List[str]], files: Sequence[str], seconds: float) -> str:
    """The whole summary: title, model line, the evaluators' sections, the files written and the time."""
    lines = ["# Evaluation summary", ""] + (model_lines(model) if model else [])
    for section in sections:
        lines += section
    lines += [f"Files: {', '.join(files)}", "", f"Total time: {seconds:.1f} s.", ""]
    return "\n".join(lines)
