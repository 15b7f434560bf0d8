"""A small synchronous client for the cotune service (httpx). Every method is one HTTP call.

>>> c = Client("http://127.0.0.1:8000")
>>> c.register("alice")                       # sets c.token
>>> f = c.upload("train.tsv")
>>> job = c.submit({"task": "seq_cls", "train": {"file_id": f["id"]}, "steps": 50})
>>> c.wait(job["id"])["status"]
'succeeded'
>>> c.download(job["id"], "adapter/")         # adapter_config.json + adapter_model.safetensors
>>> c.predict(job["id"], ["a great film"])
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from cotune.errors import CotuneError


class ServiceError(CotuneError):
    """The server answered with an error status; ``status`` is the HTTP code, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """Talks to one cotune server as one tenant (``token``)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one request with the tenant's token; errors become ``ServiceError`` with the server's reason."""
        headers = {**self._headers(), **kw.pop("headers", {})}
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise CotuneError(f"cannot reach the cotune server at {self.url} ({type(e).__name__}: {e})") from e
        _raise_for_status(r)
        return r

    def chat_stream(self, model: str, messages: list[dict[str, str]], max_tokens: int,
                    temperature: float = 0.0) -> Iterator[str]:
        """The text of ``model``'s answer (a job id or the base model) as ``/v1/chat/completions`` streams it."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "stream": True}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body, headers=self._headers(),
                                   timeout=600) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_status(r)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        raise CotuneError(f"the server failed mid-answer: {event['error']['message']}")
                    yield event["choices"][0]["delta"].get("content") or ""
        except httpx.TransportError as e:
            raise CotuneError(f"cannot reach the cotune server at {self.url} ({type(e).__name__}: {e})") from e

    # -- tenants ---------------------------------------------------------------------------------------------
    def register(self, name: str, admin_token: str | None = None) -> dict[str, Any]:
        """Register a tenant; remembers its token in ``self.token`` and returns ``{tenant_id, token}``."""
        headers = {"X-Admin-Token": admin_token} if admin_token else {}
        out = self.request("POST", "/v1/tenants", json={"name": name}, headers=headers).json()
        self.token = out["token"]
        return out

    def me(self) -> dict[str, Any]:
        return self.request("GET", "/v1/tenants/me").json()

    # -- files -----------------------------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike, filename: str | None = None) -> dict[str, Any]:
        """Upload a local data file (streamed); returns its record with the server's ``id``."""
        p = Path(path)
        if not p.is_file():
            raise CotuneError(f"{p} is not a file")
        with open(p, "rb") as f:
            return self.upload_bytes(f, filename or p.name)

    def upload_bytes(self, data: bytes | Any, filename: str) -> dict[str, Any]:
        """Upload bytes (or a binary file object) under the label ``filename``."""
        return self.request("POST", "/v1/files", params={"filename": filename}, content=data).json()

    def files(self) -> list[dict[str, Any]]:
        """The caller's uploads, newest first."""
        return self.request("GET", "/v1/files").json()["data"]

    def delete_file(self, file_id: str) -> None:
        self.request("DELETE", f"/v1/files/{file_id}")

    # -- jobs ------------------------------------------------------------------------------------------------
    def rotate_token(self) -> str:
        """A new token for this tenant (the old one stops working); remembered in ``self.token``."""
        self.token = self.request("POST", "/v1/tenants/me/token").json()["token"]
        return self.token

    def delete_job(self, job_id: str) -> None:
        """Delete a finished, failed or cancelled job with its metrics, checkpoints and adapter."""
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def delete_adapter(self, job_id: str) -> None:
        """Delete a job's trained adapter (the job's record and metrics stay)."""
        self.request("DELETE", f"/v1/jobs/{job_id}/adapter")

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job (see ``cotune.service.schemas.JobSpec`` for the fields); returns its record."""
        return self.request("POST", "/v1/jobs", json=spec).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/jobs").json()

    def metrics(self, job_id: str, since_step: int = -1) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics", params={"since_step": since_step}).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; returns its final record."""
        end = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st["status"] in ("succeeded", "failed", "cancelled"):
                return st
            if time.monotonic() > end:
                raise CotuneError(f"job {job_id} still {st['status']} (step {st['step']}) after {timeout:.0f} s")
            time.sleep(poll)

    def download(self, job_id: str, folder: str | os.PathLike) -> Path:
        """Save the trained adapter (PEFT format) into ``folder``; returns the folder."""
        data = self.request("GET", f"/v1/jobs/{job_id}/adapter").content
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                if "/" in name or "\\" in name or name.startswith("."):  # never trust archive paths
                    raise CotuneError(f"unexpected file {name!r} in the adapter archive")
                (out / name).write_bytes(z.read(name))
        return out

    def predict(self, job_id: str, inputs: list[str], max_new_tokens: int = 16) -> list[dict[str, Any]]:
        """Predictions of the job's adapter for ``inputs``."""
        body = {"inputs": list(inputs), "max_new_tokens": max_new_tokens}
        return self.request("POST", f"/v1/jobs/{job_id}/predict", json=body).json()["predictions"]

    def openapi(self) -> dict[str, Any]:
        return self.request("GET", "/openapi.json").json()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz").json()


def _raise_for_status(r: httpx.Response) -> None:
    """``ServiceError`` with the server's reason (its own ``detail`` or OpenAI's ``error.message``) for 4xx/5xx."""
    if r.status_code < 400:
        return
    try:
        body = r.json()
        detail = body.get("detail") or (body.get("error") or {}).get("message") or r.text
    except ValueError:
        detail = r.text
    raise ServiceError(r.status_code, detail if isinstance(detail, str) else str(detail))
