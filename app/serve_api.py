"""Ray Serve deployments behind `vidrt serve`: `Generator` replicas hold one Pipeline each and stream progress;
`Api` (one replica: it holds the job table) is the OpenAI-style HTTP front (see app/serve.py for the contract)."""

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayError
from starlette.exceptions import HTTPException

from vidrt.app.batch import Engine, Worker
from vidrt.core.errors import ConfigError


@ray.remote(num_cpus=0)
class CancelBoard:
    """The Api's cancelled job ids, polled by the replicas running them. Serve's own cancellation of a running
    streaming call is best effort (ray-project/ray#52533): under load it came late or never, the cancelled job's
    thread kept the Pipeline (its lock), and the replica's next job waited behind it."""

    def __init__(self):
        self.ids = set()

    def add(self, job_id: str) -> None:
        self.ids.add(job_id)

    def discard(self, job_id: str) -> None:
        self.ids.discard(job_id)

    def has(self, job_id: str) -> bool:
        return job_id in self.ids


@serve.deployment(max_ongoing_requests=1)  # one Pipeline runs one request; Serve queues the rest
class Generator:
    def __init__(self, engine: Engine):
        self.worker = Worker(engine)

    async def generate(self, params: dict, job_id: str | None = None, board=None):
        """Yields {"type": "started"}, {"type": "progress", step, of}..., then the Worker's result. Cancelling the
        call, or adding job_id to `board` (a CancelBoard), stops the Pipeline at its next step."""
        loop, events, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        ask, asked_at, told_at = None, 0.0, 0.0  # the board's pending answer, when it was asked; last progress sent

        def step(i: int, of: int) -> bool:
            nonlocal ask, asked_at, told_at
            # progress at most every 0.1 s (and the last step): one streamed event per step went through the Serve
            # handle to the Api, on the cores the step needs; at 150 tiny steps that made a video 1.46x slower
            if i == of or time.monotonic() - told_at >= 0.1:
                told_at = time.monotonic()
                loop.call_soon_threadsafe(events.put_nowait, {"type": "progress", "step": i, "of": of})
            if board is not None:  # asked at most every 0.2 s, never waited for: steps run at full speed
                if ask is not None and ray.wait([ask], timeout=0)[0]:
                    try:
                        if ray.get(ask):
                            stop.set()
                    except RayError:
                        pass  # the Api is gone; Serve's own cancellation still applies
                    ask = None
                if ask is None and time.monotonic() - asked_at >= 0.2:
                    ask, asked_at = board.has.remote(job_id), time.monotonic()
            return not stop.is_set()
        run = loop.run_in_executor(None, self.worker.run, 0, params, step)
        try:
            yield {"type": "started", "worker": self.worker.where}
            while not run.done():
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, run}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield {"type": "result"} | run.result()
        finally:
            stop.set()
            if not run.done():
                await asyncio.wait({run})


MAX_PROMPT_CHARS = 4096  # a prompt (or negative prompt) longer than this is refused with 422, never tokenized
MAX_BODY_BYTES = 1 << 20  # a create body over this is refused with 413 before it is read
POLL_AFTER_MS = 250  # the pace the OpenAI SDK's poll helper follows (openai-poll-after-ms)


@dataclass(frozen=True)
class Guard:
    """What the Api replica checks on every /v1 request before any work: the API keys (none: loopback only, which
    app/serve.start enforces) and the body size limit."""
    keys: tuple[str, ...] = ()
    max_body: int = MAX_BODY_BYTES

    def refuse(self, request: Request) -> JSONResponse | None:
        if self.keys:
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.keys):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (OpenAI(api_key=KEY))",
                             "invalid_api_key", kind="authentication_error")
        n = request.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > self.max_body):
            return error(413, f"request body of {n} bytes; the limit is {self.max_body}", "body_too_large")
        return None


class VideoRequest(BaseModel):
    """OpenAI's create-video body (model, prompt, seconds, size) plus the Pipeline's own knobs."""
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    seconds: float | str | None = None  # rounded to the nearest k * (the VAE's time factor) + 1 frames
    size: str | None = None  # "WIDTHxHEIGHT"
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = 0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # two-expert models (Wan 2.2 A14B): the low-noise expert's


@dataclass
class Job:
    id: str
    params: dict
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued, in_progress, completed, failed, cancelled, expired
    queued_at: float = field(default_factory=time.time)  # again when a dead replica's job is queued again
    attempts: int = 0
    worker: str | None = None  # host:pid of the replica running it
    progress: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    error: dict | None = None
    result: dict | None = None
    call: object = None  # the streaming Serve call, for cancel

    def view(self, model: str, fps: int) -> dict:
        """The OpenAI Video object (every field the SDK's type declares) plus vidrt's own."""
        p, r = self.params, self.result or {}
        return {"id": self.id, "object": "video", "model": model, "status": self.status, "progress": self.progress,
                "created_at": int(self.created_at), "completed_at": self.completed_at and int(self.completed_at),
                "expires_at": self.expires_at and int(self.expires_at), "prompt": p["prompt"], "seed": p["seed"],
                "seconds": f"{p['num_frames'] / fps:g}", "size": f"{p['width']}x{p['height']}",
                "remixed_from_video_id": None, "num_frames": p["num_frames"], "error": self.error,
                "sha256": r.get("sha256"), "worker": self.worker, "attempts": self.attempts,
                "timings": r.get("timings")}


def error(status: int, message: str, code: str, param: str | None = None, headers: dict | None = None,
          kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


api = FastAPI(title="vidrt")


def _invalid_response(errors: list[dict], skip: int) -> JSONResponse:
    e = errors[0]
    where = ".".join(str(x) for x in e["loc"][skip:]) or None
    return error(422, f"{where}: {e['msg']}" if where else e["msg"], "invalid_value", where)


@api.exception_handler(RequestValidationError)
async def _invalid(_req: Request, exc: RequestValidationError):
    return _invalid_response(exc.errors(), 1)


async def read_create(request: Request, max_body: int) -> VideoRequest | JSONResponse:
    """The create body as the OpenAI SDK sends it (multipart/form-data; extra_body fields as more form fields) or as
    JSON; an uploaded input_reference is refused with 422 naming what this server does."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            fields = dict(await request.form(max_files=1, max_fields=32, max_part_size=max_body))
        except HTTPException as e:  # a malformed body, or past the part/field limits
            return error(e.status_code, f"multipart body refused: {e.detail}", "invalid_form")
        if "input_reference" in fields:
            return error(422, "input_reference (image-to-video) is not served yet: this server generates text-to-video"
                         " only; send the prompt alone", "unsupported_value", "input_reference")
    else:
        try:
            fields = json.loads(await request.body() or b"null")
        except ValueError as e:
            return error(422, f"the body is not JSON: {e}", "invalid_json")
    try:
        return VideoRequest.model_validate(fields)
    except ValidationError as e:
        return _invalid_response(e.errors(), 0)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    def __init__(self, generator, engine: Engine, model_name: str, max_queued: int, ttl_s: float,
                 queue_timeout_s: float, retries: int, guard: Guard = Guard()):
        # checked in each /v1 route, on this replica (a FastAPI middleware may run in Serve's proxy, without them)
        self.guard = guard
        # Requests are validated here, before queueing, on a CPU copy of the engine (the replica checks again)
        pipe = Engine(engine.model, engine.bundle, "onnxruntime", engine.precision).load()
        self.check, self.fps = pipe.request, pipe.cfg.sample.fps
        # frames are k * (the VAE's time factor) + 1: 4 for vidrt and Wan, 8 for LTX
        self.tf = pipe.cfg.temporal_factor
        self.generator, self.model = generator.options(method_name="generate", stream=True), model_name
        self.max_queued, self.ttl_s, self.queue_timeout_s = max_queued, ttl_s, queue_timeout_s
        self.jobs, self.sweeper, self.retries = {}, None, retries
        self.board = CancelBoard.remote()  # owned by this replica: it goes when the Api goes

    def _sweep(self) -> None:
        """Expiry: a job queued past queue_timeout_s is cancelled; a finished job's video is dropped at expires_at,
        and the job itself ttl_s later."""
        now = time.time()
        for j in list(self.jobs.values()):
            if j.status == "queued" and now - j.queued_at > self.queue_timeout_s:
                self._stop(j, "expired", {"code": "queue_timeout", "message": f"not started within "
                                          f"{self.queue_timeout_s:g} s; retry later or raise --queue-timeout"})
            elif j.expires_at and now > j.expires_at and j.status != "expired":
                j.status, j.result = "expired", None
            elif j.expires_at and now > j.expires_at + self.ttl_s:
                self._forget(j)

    async def _sweep_forever(self) -> None:
        while True:
            self._sweep()
            await asyncio.sleep(0.5)

    def _finish(self, j: Job, status: str, err: dict | None = None) -> None:
        j.status, j.error, j.completed_at = status, err, time.time()
        j.expires_at = j.completed_at + self.ttl_s

    def _stop(self, j: Job, status: str, err: dict | None) -> None:
        self.board.add.remote(j.id)  # what stops a running job for sure; cancel() alone may not reach the replica
        if j.call is not None:
            j.call.cancel()
        self._finish(j, status, err)

    def _forget(self, j: Job) -> None:
        self.jobs.pop(j.id, None)
        self.board.discard.remote(j.id)

    async def _run(self, j: Job) -> None:
        """Stream the job's events; a replica that dies mid-job (Serve replaces it) costs an attempt, and the job
        goes back to the queue up to `retries` times."""
        while await self._attempt(j) and j.attempts <= self.retries:
            j.status, j.progress, j.queued_at = "queued", 0, time.time()

    async def _attempt(self, j: Job) -> bool:
        """One try; True when the replica died and the job may run again."""
        j.attempts += 1
        j.call = self.generator.remote(j.params, j.id, self.board)
        try:
            async for ev in j.call:
                if j.status not in ("queued", "in_progress"):
                    break  # cancelled or expired meanwhile
                if ev["type"] == "started":
                    j.status, j.started_at, j.worker = "in_progress", time.time(), ev["worker"]
                elif ev["type"] == "progress":
                    j.progress = int(100 * ev["step"] / ev["of"])
                elif ev["status"] == "done":
                    j.result, j.progress = ev, 100
                    self._finish(j, "completed")
                else:
                    code = "invalid_request" if ev["status"] == "invalid" else ev["status"]
                    self._finish(j, "cancelled" if ev["status"] == "cancelled" else "failed",
                                 {"code": code, "message": ev["error"]})
        except Exception as e:  # cancelled by us, or the replica died: the job says which
            if j.status not in ("queued", "in_progress"):
                return False
            died = isinstance(e, RayActorError)
            if died and j.attempts <= self.retries:
                return True
            self._finish(j, "failed", {"code": "worker_died" if died else "worker_error",
                                       "message": f"attempt {j.attempts}: {type(e).__name__}: {e}"[:500]})
        return False

    def _job(self, video_id: str) -> Job | JSONResponse:
        self._sweep()
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        j = self.jobs.get(video_id)
        return j if j else error(404, f"no video {video_id!r} (unknown, deleted or expired long ago)", "not_found",
                                 "video_id")

    @api.get("/healthz")  # the name; /health kept for clients that probe that one
    @api.get("/health")
    def health(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "vidrt"}]}

    @api.post("/v1/videos")
    async def create(self, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        body = await read_create(request, self.guard.max_body)
        if isinstance(body, JSONResponse):
            return body
        self._job("")  # sweep first: expired jobs free their queue places
        if body.model not in (None, self.model):
            return error(404, f"model {body.model!r} is not served here; this server serves {self.model!r}",
                         "model_not_found", "model")
        kw = body.model_dump(exclude={"model", "seconds", "size"})
        try:
            if body.size is not None:
                w, h = (int(x) for x in body.size.lower().split("x"))
                kw |= {"width": w, "height": h}
            if body.seconds is not None:
                kw["num_frames"] = self.tf * round(float(body.seconds) * self.fps / self.tf) + 1
            r = self.check(**{k: v for k, v in kw.items() if v is not None})
        except ValueError as e:  # ConfigError, and a malformed size/seconds
            return error(422, str(e) if isinstance(e, ConfigError) else f"size must be WIDTHxHEIGHT, seconds a "
                         f"number: {e}", "invalid_value")
        except Exception as e:  # BackendError (a shape the bundle does not serve) and the like
            return error(422, str(e), "invalid_value")
        queued = sum(j.status == "queued" for j in self.jobs.values())
        if queued >= self.max_queued:
            return error(429, f"{queued} requests are already queued (--max-queued {self.max_queued}); retry later",
                         "queue_full", headers={"Retry-After": "1"})
        params = {"prompt": r.prompts[0], "negative_prompt": r.negative_prompts[0], "seed": r.seed,
                  "num_frames": r.num_frames, "height": r.height, "width": r.width,
                  "num_inference_steps": r.num_inference_steps, "guidance_scale": r.guidance_scale,
                  **({} if r.guidance_scale_2 is None else {"guidance_scale_2": r.guidance_scale_2})}
        j = Job(f"video_{uuid.uuid4().hex}", params)
        self.jobs[j.id] = j
        asyncio.get_running_loop().create_task(self._run(j))
        return j.view(self.model, self.fps)

    # async: FastAPI runs plain `def` routes in worker threads, and the job table, the sweeper task and Serve's call
    # handles belong to the event loop
    @api.get("/v1/videos")
    async def list_videos(self, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        self._sweep()
        return {"object": "list", "data": [j.view(self.model, self.fps) for j in self.jobs.values()]}

    @api.get("/v1/videos/{video_id}")
    async def get(self, video_id: str, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        j = self._job(video_id)
        if not isinstance(j, Job):
            return j
        busy = j.status in ("queued", "in_progress")
        return JSONResponse(j.view(self.model, self.fps),
                            headers={"openai-poll-after-ms": str(POLL_AFTER_MS)} if busy else None)

    @api.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        j = self._job(video_id)
        if not isinstance(j, Job):
            return j
        if j.status == "expired":
            return error(410, f"video {video_id} expired at {j.expires_at:.0f}; generate it again", "expired")
        if j.status != "completed":
            return error(409, f"video {video_id} is {j.status}, not completed", "video_not_ready")
        return Response(j.result["data"], media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{video_id}.mp4"'})

    @api.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str, request: Request):
        if refused := self.guard.refuse(request):
            return refused
        """A queued or running video is cancelled (kept, status cancelled); a finished one is deleted."""
        j = self._job(video_id)
        if not isinstance(j, Job):
            return j
        if j.status in ("queued", "in_progress"):
            self._stop(j, "cancelled", {"code": "cancelled", "message": "cancelled by DELETE"})
            return j.view(self.model, self.fps)
        self._forget(j)
        return {"id": video_id, "object": "video.deleted", "deleted": True}
