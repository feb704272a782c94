"""The errors rltk raises for bad input or a run that must stop; the CLI prints them without a traceback."""

from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type that means "the input is wrong" or "the run must stop" (message names the fix)."""
    from rltk.chat import ToolTemplateError
    from rltk.checkpoint import CheckpointError
    from rltk.compare import CompareError
    from rltk.config import ConfigError
    from rltk.contract import EnvContractError
    from rltk.export import ExportError
    from rltk.failures import NonFiniteError
    from rltk.models import ModelError
    from rltk.plugins import PluginError
    from rltk.reward import RewardError
    from rltk.rollout import PromptTooLongError
    from rltk.rundir import RunDirBusyError
    from rltk.serve import ServeError

    return (
        ConfigError,
        CompareError,
        PluginError,
        EnvContractError,
        ModelError,
        CheckpointError,
        RewardError,
        ExportError,
        PromptTooLongError,
        ToolTemplateError,
        NonFiniteError,
        RunDirBusyError,
        ServeError,
        FileNotFoundError,
    )
