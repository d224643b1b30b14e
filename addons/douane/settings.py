"""The bundle's options and its configuration file; the other addons read `settings.config`."""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import ctx, exceptions

from douane import config as configmod

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


class Settings:
    def __init__(self) -> None:
        # Set by configure() before any flow arrives: mitmproxy aborts start-up on a bad config.
        self.config: configmod.Config = None  # type: ignore[assignment]

    def load(self, loader) -> None:
        loader.add_option("douane_config", str, str(DEFAULT_CONFIG),
                          "douane's YAML configuration file (identity, upstreams, policies, ...).")

    def configure(self, updated: set[str]) -> None:
        if "douane_config" in updated or self.config is None:
            try:
                self.config = configmod.load(ctx.options.douane_config)
            except configmod.ConfigError as e:
                raise exceptions.OptionsError(f"douane: {e}") from None
            logger.info("douane: configuration %s (version %s), %d upstream(s)",
                        self.config.file, self.config.version, len(self.config.upstreams))

    def running(self) -> None:
        # No upstream connection before a request is authenticated and routed (mitmproxy's
        # default, eager, connects for every client connection, and to a host a stand-in
        # replaces).
        ctx.options.update(connection_strategy="lazy")
        # `--set` with an unknown name is silently deferred by mitmproxy; a misspelled douane
        # option would otherwise leave a control silently off.
        unknown = sorted(k for k in ctx.options.deferred if k.startswith("douane"))
        if unknown:
            logger.error("douane: unknown option(s) %s; refusing to start", ", ".join(unknown))
            ctx.master.shutdown()
