"""`vidrt serve`: an OpenAI-style video API on Ray Serve. POST /v1/videos queues a job (422 invalid, 429 when
`max_queued` jobs wait), GET /v1/videos/{id} gives status and progress, GET /v1/videos/{id}/content the mp4 (409 not
ready, 410 expired), DELETE cancels a queued/running job or deletes a finished one. Finished videos expire after
`ttl_s`; a job not started within `queue_timeout_s` expires unrun. Replicas hold one Pipeline each. With API keys every
/v1 request needs one (Bearer); without, the server listens on loopback only unless `insecure_no_auth`."""
from __future__ import annotations

import ipaddress
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from vidrt.app.batch import Engine, connect, replica_options

KEY_ENV = "VIDRT_API_KEY"


@dataclass
class ServeConfig:
    engine: Engine = field(default_factory=Engine)
    replicas: int = 1
    max_queued: int = 16  # jobs waiting for a replica; one more is refused with 429
    ttl_s: float = 3600.0  # a finished video is kept this long
    queue_timeout_s: float = 600.0
    retries: int = 2  # extra attempts for a job whose replica died
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # Ray cluster; None: the current session, else a new local one
    name: str = "vidrt"  # the Serve application's name
    api_keys: tuple[str, ...] = ()  # and VIDRT_API_KEY (comma-separated); none: loopback only
    insecure_no_auth: bool = False  # listen beyond loopback without a key (behind your own gateway)

    @property
    def keys(self) -> tuple[str, ...]:
        env = tuple(k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip())
        return tuple(dict.fromkeys(self.api_keys + env))

    @property
    def model_name(self) -> str:
        return Path(self.engine.bundle).name if self.engine.bundle else self.engine.model


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_auth(cfg: ServeConfig) -> None:
    """ValueError, before anything starts, for a server that would let strangers in: a non-loopback host without an
    API key (unless insecure_no_auth), or an empty key."""
    if any(not k or len(k) < 8 for k in cfg.keys):
        raise ValueError("an API key must be at least 8 characters")
    if not cfg.keys and not _loopback(cfg.host) and not cfg.insecure_no_auth:
        raise ValueError(f"--host {cfg.host} without an API key would let anyone who reaches the port generate, read "
                         f"and delete videos: pass --api-key KEY (or set {KEY_ENV}), or --insecure-no-auth if a "
                         "gateway in front of it authenticates")


def app(cfg: ServeConfig):
    """The Serve application graph (serve.run it); imports Ray Serve only when called."""
    from vidrt.app.serve_api import Api, Generator, Guard  # lazy: --help speed (fastapi, torch)
    e = cfg.engine
    gen = Generator.options(num_replicas=cfg.replicas, ray_actor_options={"num_cpus": e.cpus, "num_gpus": e.gpus},
                            max_queued_requests=cfg.max_queued + cfg.replicas).bind(e)
    return Api.bind(gen, e, cfg.model_name, cfg.max_queued, cfg.ttl_s, cfg.queue_timeout_s, cfg.retries,
                    Guard(cfg.keys))


def start(cfg: ServeConfig) -> str:
    """Deploy on Ray (starting a local cluster if none is connected); returns the base URL."""
    from ray import serve

    if cfg.replicas < 1 or cfg.max_queued < 0 or cfg.ttl_s <= 0 or cfg.queue_timeout_s <= 0 or cfg.retries < 0:
        raise ValueError(f"replicas >= 1, max_queued >= 0, retries >= 0, ttl_s and queue_timeout_s > 0; got {cfg}")
    check_auth(cfg)
    connect(cfg.address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app(cfg), name=cfg.name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


@click.command("serve")
@replica_options(replicas="One Pipeline each", retries="Extra attempts for a job whose replica died")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="0.0.0.0 to listen on every interface (needs --api-key, or --insecure-no-auth)")
@click.option("--api-key", "api_keys", multiple=True,
              help=f"A key clients send as 'Authorization: Bearer KEY' (repeatable; also {KEY_ENV}=K1,K2)")
@click.option("--insecure-no-auth", is_flag=True, help="Listen beyond loopback without a key (a gateway authenticates)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-queued", type=click.IntRange(min=0), default=16, show_default=True,
              help="Jobs waiting for a replica; more get 429")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=0, min_open=True), default=3600, show_default=True,
              help="Seconds a finished video is kept")
@click.option("--queue-timeout", "queue_timeout_s", type=click.FloatRange(min=0, min_open=True), default=600,
              show_default=True, help="Seconds a job may wait for a replica before it expires")
def serve_command(model, bundle, backend, precision, replicas, gpus_per_replica, cpus_per_replica, address, retries,
                  host, api_keys, insecure_no_auth, port, max_queued, ttl_s, queue_timeout_s):
    """Serve an OpenAI-style video API (POST/GET/DELETE /v1/videos, GET /v1/videos/ID/content) on Ray Serve
    until Ctrl-C."""
    cfg = ServeConfig(Engine(model, bundle, backend, precision, gpus_per_replica, cpus_per_replica), replicas,
                      max_queued, ttl_s, queue_timeout_s, retries, host, port, address, api_keys=tuple(api_keys),
                      insecure_no_auth=insecure_no_auth)
    from ray import serve
    try:
        url = start(cfg)
    except (ValueError, OSError, RuntimeError) as e:  # ConfigError is a ValueError
        raise click.ClickException(str(e)) from e
    auth = f"{len(cfg.keys)} API key(s)" if cfg.keys else "no API key (loopback only)" if _loopback(host) else \
        "NO AUTHENTICATION (--insecure-no-auth)"
    click.echo(f"serving {cfg.model_name} on {url}/v1/videos with {replicas} replica(s), {auth}; Ctrl-C stops")

    def stop(*_):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM (service managers) shuts Serve down like Ctrl-C
        signal.signal(sig, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
