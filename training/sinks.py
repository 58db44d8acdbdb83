"""Optional metric sinks beside the run log. wandb: WANDB_API_KEY comes from the environment
(wandb reads it itself; it is never passed or logged here); WANDB_MODE=offline needs no network."""

from __future__ import annotations


class NullSink:
    def log(self, fields: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbSink(NullSink):
    def __init__(self, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            from runtime.errors import ConfigError

            raise ConfigError("--wandb needs the wandb package; pip install -r requirements.txt or drop --wandb.") from None
        self._wandb = wandb
        # id=name: a resumed run continues the same wandb run.
        self.run = wandb.init(project=project, name=name, id=name, resume="allow", config=config)

    def log(self, fields: dict, step: int) -> None:
        numeric = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(numeric, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_sink(cfg, config: dict, enabled: bool) -> NullSink:
    if not (cfg.wandb and enabled):
        return NullSink()
    return WandbSink(cfg.wandb_project, cfg.log_name, config)
