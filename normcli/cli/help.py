"""How every command's --help reads: options in panels, meaningful metavars, every default shown.

Typer shows a value's Python type (``<str>``, ``<list[str]>``) where an option names no metavar and wraps
required arguments in braces (``{path}``); this module gives each parameter the metavar a user reads
(``PATH``, ``SHAPE``, ``SPEC``, ``N``, ``X``), its panel, and the default it falls back to, in one place for
all commands, so that help cannot drift between them.
"""

from __future__ import annotations

from typing import Any


from typer.core import TyperArgument, TyperCommand, TyperGroup

PANELS = ("Input", "Model", "Output", "Checks", "Safety")
HELP_PANEL = "Help"  # -h and --debug, after the others

# parameter name (the function argument) -> panel
PANEL_OF = {
    # what is read
    "paths": "Input", "path": "Input", "key": "Input", "layer": "Input", "data": "Input", "inputs": "Input",
    "expected": "Input", "input_shape": "Input", "input_file": "Input", "batches": "Input",
    "batch_size": "Input", "resize": "Input", "mean": "Input", "std": "Input", "jobs": "Input",
    # how the model is built or changed
    "arch": "Model", "arch_kwargs": "Model", "to": "Model", "include": "Model", "exclude": "Model",
    "learnable_eps": "Model", "batch": "Model", "real_batch": "Model", "warmup_iters": "Model",
    "momentum": "Model", "cenconv": "Model", "groups": "Model", "call": "Model", "forward": "Model",
    "exporter": "Model", "opset": "Model", "dynamic_batch": "Model", "precision": "Model", "lower_unfolded": "Model",
    "provider": "Model",
    # what is written or printed
    "output": "Output", "json_out": "Output", "fmt": "Output", "save_fused": "Output", "save_inputs": "Output",
    "save_outputs": "Output", "keep_on_fail": "Output", "quiet": "Output", "verbose": "Output",
    # what is judged
    "fail_on": "Checks", "eps": "Checks", "tiny_var_ratio": "Checks", "dead_weight": "Checks",
    "fp16_max": "Checks", "tiny_direction_ratio": "Checks", "atol": "Checks", "rtol": "Checks",
    "samples": "Checks", "check_error_stat": "Checks", "error_quantile": "Checks", "strict": "Checks",
    "compare_intermediates": "Checks",
    # what may run or be overwritten
    "unsafe_load": "Safety", "limit": "Safety", "force": "Safety",
    "help": HELP_PANEL, "debug": HELP_PANEL,
}

# metavars for options that name none where they are declared (the value's kind, never a Python type)
METAVAR_OF = {"key": "ENTRY", "output": "PATH", "eps": "X", "tiny_var_ratio": "X", "dead_weight": "X",
              "fp16_max": "X", "tiny_direction_ratio": "X", "batch": "N", "real_batch": "N",
              "warmup_iters": "N", "momentum": "X"}
METAVAR_BY_TYPE = {"int": "N", "float": "X", "str": "TEXT"}

# what an option left unset means, for options whose default is None and whose help does not already say it
UNSET_MEANS = {"arch": "none: the file's own classes or names", "arch_kwargs": "{}", "layer": "none",
               "include": "every norm", "exclude": "none", "limit": "the README's limits", "key": "found "
               "automatically", "call": "model(batch)", "resize": "as stored", "mean": "0", "std": "1",
               "fmt": "table", "provider": "cpu", "check_error_stat": "every element", "save_fused": "none",
               "input_file": "none", "save_inputs": "none", "save_outputs": "none", "precision": "fp32"}


def _type_name(param) -> str:
    try:
        return param.bare_type()
    except Exception:  # an option Typer did not build (completion's)
        return ""


# options whose metavar lists choices too long for the name column: a short metavar, and the choices as the
# first words of the help
CHOICES_METAVAR = {"to": "TARGET"}


def polish(param, panels: bool = True) -> None:
    """Give one Typer parameter its panel, metavar and shown default (instance attributes; Typer builds the
    parameters anew for every invocation)."""
    panel = PANEL_OF.get(param.name) if panels else None
    if isinstance(param, TyperArgument):
        if param.rich_help_panel is None and panel is not None and param.name not in ("paths", "path"):
            param.rich_help_panel = panel
        many = param.nargs != 1
        shown = param.metavar or param.name.upper()
        if shown.endswith("..."):
            shown = shown[:-3]
        param.metavar = shown
        label = shown + ("..." if many else "")
        param.display_type_rich = lambda ctx: None          # the metavar says what it is
        param._rich_display_name = lambda: label
        param._usage_display_name = lambda: label if param.required else f"[{label}]"
        return
    if getattr(param, "param_type_name", None) != "option":
        return
    if getattr(param, "rich_help_panel", None) is None and panel is not None:
        param.rich_help_panel = panel
    if param.is_flag:
        param.display_type_rich = lambda ctx: None
        if param.secondary_opts and param.default is None:
            _show_default(param, _swap_flag_default(param))
        return
    if param.name in CHOICES_METAVAR and param.metavar and "|" in param.metavar:
        param.help = f"\\[{param.metavar}] {param.help or ''}"
        param.metavar = CHOICES_METAVAR[param.name]
    if param.metavar is None:
        param.metavar = METAVAR_OF.get(param.name) or METAVAR_BY_TYPE.get(_type_name(param), "VALUE")
    if param.required:
        return
    help_text = (param.help or "").lower()
    if param.default is None or param.default == () or param.default == []:
        if "default" not in help_text:
            _show_default(param, UNSET_MEANS.get(param.name, "none"))
    else:
        param.show_default = True


def _swap_flag_default(param) -> str:
    """A swap target's on/off option left unset takes the target's default from the registry."""
    from normcli.swap import SWAP_TARGETS

    for target in SWAP_TARGETS.values():
        if param.name in target.defaults:
            on, off = param.opts[0], param.secondary_opts[0]
            return on if target.defaults[param.name] else off
    return "none"


def _show_default(param, text: str) -> None:
    param.show_default = True
    param._extract_default_help_str = lambda ctx: text
    param._get_default_string = lambda **kwargs: text


class NormcliCommand(TyperCommand):
    """A Typer command whose parameters read as :func:`polish` makes them, listed panel by panel."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if not getattr(param, "_normcli_polished", False):
                polish(param)
                param._normcli_polished = True
        order = [*PANELS, HELP_PANEL]

        def rank(param) -> int:
            panel = getattr(param, "rich_help_panel", None)
            return order.index(panel) if panel in order else len(order)

        return sorted(params, key=rank)


class NormcliGroup(TyperGroup):
    """The root: its few options in one panel, polished like the commands'."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if not getattr(param, "_normcli_polished", False):
                polish(param, panels=False)
                param._normcli_polished = True
        return params
