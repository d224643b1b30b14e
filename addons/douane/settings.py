"""The bundle's options and its configuration file; the other addons read `settings.config`."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from mitmproxy import ctx, exceptions

from douane import config as configmod

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
WORKER_NAME = re.compile(r"[a-z0-9]{1,16}")


def for_worker(config: configmod.Config, worker: str, approvals_port: int = 0) -> configmod.Config:
    """One of several gateway processes of one machine (`scripts/run --workers N`): each writes its
    own audit chain (`audit.jsonl` becomes `audit.WORKER.jsonl`, linear per writer) and its own
    recordings folder (`recordings/WORKER/`, one writer per SQLite index) and is the replica
    `HOST/WORKER` in a shared store; the CA, keys and the configuration are shared. Its approvals
    API listens on `approvals_port` of loopback, behind the balancer's `approvals.listen` (the
    address its links name)."""
    audit = config.audit.path
    sections = dict(config.sections)
    approvals = sections.get("approvals")
    if approvals and approvals_port:
        sections["approvals"] = dataclasses.replace(
            approvals, host="127.0.0.1", port=approvals_port,
            public_url=approvals.public_url or approvals.base_url(approvals.port))
    if sections.get("recording"):
        sections["recording"] = dataclasses.replace(sections["recording"],
                                                    dir=sections["recording"].dir / worker)
    return dataclasses.replace(config, sections=sections, worker=worker, audit=dataclasses.replace(
        config.audit, path=audit.with_name(f"{audit.stem}.{worker}{audit.suffix}")))


class Settings:
    def __init__(self) -> None:
        # Set by configure() before any flow arrives: mitmproxy aborts start-up on a bad config.
        self.config: configmod.Config = None  # type: ignore[assignment]

    def load(self, loader) -> None:
        loader.add_option("douane_config", str, str(DEFAULT_CONFIG),
                          "douane's YAML configuration file (identity, upstreams, policies, ...).")
        loader.add_option("douane_worker", str, "",
                          "This process's name among several of one machine (scripts/run "
                          "--workers): its own audit log and recordings folder.")
        loader.add_option("douane_worker_approvals", int, 0,
                          "With douane_worker: the loopback port of this worker's approvals "
                          "API (the balancer listens on approvals.listen).")

    def configure(self, updated: set[str]) -> None:
        if {"douane_config", "douane_worker", "douane_worker_approvals"} & updated or \
                self.config is None:
            worker = ctx.options.douane_worker
            if worker and not WORKER_NAME.fullmatch(worker):
                raise exceptions.OptionsError("douane: douane_worker must be 1-16 lower-case "
                                              "letters or digits")
            try:
                config = configmod.load(ctx.options.douane_config)
            except configmod.ConfigError as e:
                raise exceptions.OptionsError(f"douane: {e}") from None
            self.config = for_worker(config, worker, ctx.options.douane_worker_approvals) \
                if worker else config
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
