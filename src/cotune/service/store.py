"""Durable state of the service: SQLite for tenants, files, jobs and metrics; blobs on disk under ``root``.

Layout of ``root``::

    cotune.db                 SQLite (WAL): tenants, files, jobs, metrics
    files/<file id>/data.<ext> uploaded data, stored under a server-generated id (never the client's name)
    jobs/<job id>/ckpt-<step>/ adapter + engine state of one checkpoint; ``jobs/<id>/LATEST`` names the newest
    jobs/<job id>/adapter/    the finished adapter (PEFT format)

Every write that a crash could tear is made to a temporary name and renamed into place, so after a SIGKILL
the store holds either the old or the new version of each file, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT NOT NULL, created REAL NOT NULL,
    deleted_compute INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id), filename TEXT NOT NULL,
    ext TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id), spec TEXT NOT NULL,
    status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL,
    checkpoint_step INTEGER NOT NULL DEFAULT 0, resumed_from INTEGER, error TEXT,
    created REAL NOT NULL, started REAL, finished REAL, result TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs(id), step INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job_id, step);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant_id);
CREATE INDEX IF NOT EXISTS files_tenant ON files(tenant_id);
"""

#: Job states. ``queued`` and ``running`` jobs are (re)started by the runner when the server starts.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
#: a remote-fitter job whose worker did not answer in time: out of the rounds until a worker connects again
PAUSED = "paused"
ACTIVE_STATES = (QUEUED, RUNNING)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
#: The one ``purpose`` (OpenAI's ``files.create``) a file here can have: data for training jobs.
PURPOSE = "fine-tune"


def new_id() -> str:
    """A server-generated identifier (32 hex digits): the only name anything gets on disk."""
    return uuid.uuid4().hex


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (a reader never sees half of it).

    ``durable``: also ``fsync`` it (all or nothing on a crash of the machine); off for files that are rebuilt after
    a restart anyway (a remote job's frames), where it would only cost every update a disk flush."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


@dataclass
class FileRecord:
    id: str
    tenant_id: str
    filename: str
    ext: str
    size: int
    sha256: str
    created: float

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "filename": self.filename, "size": self.size, "sha256": self.sha256,
                "created": self.created,
                # OpenAI's file object, so that its client reads an upload (every file here is training data)
                "object": "file", "bytes": self.size, "created_at": int(self.created), "purpose": PURPOSE,
                "status": "processed"}


@dataclass
class JobRecord:
    id: str
    tenant_id: str
    spec: dict[str, Any]
    status: str
    step: int
    total_steps: int
    checkpoint_step: int
    resumed_from: int | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None

    @property
    def key(self) -> str:
        """The job's tenant id in the bank (module-dict keys may not contain dots; job ids are hex)."""
        return f"job_{self.id}"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "status": self.status, "step": self.step, "total_steps": self.total_steps,
            "progress": round(self.step / self.total_steps, 4) if self.total_steps else 0.0,
            "checkpoint_step": self.checkpoint_step, "resumed_from": self.resumed_from, "error": self.error,
            "created": self.created, "started": self.started, "finished": self.finished,
            "result": self.result, "spec": self.spec,
        }


class Store:
    """Thread-safe access to the service's SQLite database and its folders under ``root``."""

    def __init__(self, root: str | os.PathLike, clean: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        for d in (self.root, self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # One connection shared by the HTTP threads and the runner, serialised by the lock: SQLite allows one
        # writer at a time anyway, and the statements here are all tiny.
        # The API and the trainer process share the database: a writer waits up to 30 s for the other's lock.
        self._db = sqlite3.connect(self.root / "cotune.db", check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            # WAL + synchronous=NORMAL: a committed transaction survives the process being killed.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(tenants)")}
            if "deleted_compute" not in columns:  # a database from before the compute quota
                self._db.execute("ALTER TABLE tenants ADD COLUMN deleted_compute INTEGER NOT NULL DEFAULT 0")
        if clean:  # not in the trainer process, while the API process may be receiving an upload
            self._clean_temporaries()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _clean_temporaries(self) -> None:
        # Leftovers of an upload or checkpoint interrupted by a crash: never referenced, safe to delete.
        for p in [*self.files_dir.glob(".*.tmp"), *self.files_dir.glob("*/.*.tmp")]:
            p.unlink(missing_ok=True)
        for d in self.files_dir.iterdir():  # the folder of an upload killed before it was recorded
            if d.is_dir() and not any(d.iterdir()) and self._one("SELECT 1 FROM files WHERE id = ?", (d.name,)) is None:
                d.rmdir()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- tenants -----------------------------------------------------------------------------------------
    def add_tenant(self, tenant_id: str, name: str, token_hash: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tenants (id, name, token_hash, created) VALUES (?, ?, ?, ?)",
                       (tenant_id, name, token_hash, time.time()))

    def tenant(self, tenant_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM tenants WHERE id = ?", (tenant_id,))
        return dict(row) if row else None

    def set_token_hash(self, tenant_id: str, token_hash: str) -> None:
        """Replace the tenant's token (rotation; ``REVOKED`` locks the tenant out)."""
        with self._tx() as db:
            db.execute("UPDATE tenants SET token_hash = ? WHERE id = ?", (token_hash, tenant_id))

    # -- files -------------------------------------------------------------------------------------------
    def file_path(self, file_id: str, ext: str) -> Path:
        """Where file ``file_id`` lives; ids are hex, so the path cannot leave ``files/``."""
        if not (len(file_id) == 32 and all(c in "0123456789abcdef" for c in file_id)):
            raise CotuneError(f"invalid file id {file_id!r}")
        return self.files_dir / file_id / f"data{ext}"

    def add_file(self, rec: FileRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.tenant_id, rec.filename, rec.ext, rec.size, rec.sha256, rec.created),
            )

    def get_file(self, file_id: str, tenant_id: str) -> FileRecord | None:
        """The file if it exists *and belongs to* ``tenant_id`` (other tenants' files look absent)."""
        row = self._one("SELECT * FROM files WHERE id = ? AND tenant_id = ?", (file_id, tenant_id))
        return FileRecord(**dict(row)) if row else None

    def list_files(self, tenant_id: str) -> list[FileRecord]:
        return [FileRecord(**dict(r)) for r in self._all(
            "SELECT * FROM files WHERE tenant_id = ? ORDER BY created", (tenant_id,))]

    def delete_file(self, rec: FileRecord) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM files WHERE id = ?", (rec.id,))
        path = self.file_path(rec.id, rec.ext)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass

    # -- jobs --------------------------------------------------------------------------------------------
    def add_job(self, job_id: str, tenant_id: str, spec: dict[str, Any], total_steps: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, tenant_id, spec, status, total_steps, created) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, tenant_id, json.dumps(spec), QUEUED, total_steps, time.time()),
            )
        (self.jobs_dir / job_id).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return JobRecord(**d)

    def get_job(self, job_id: str, tenant_id: str | None = None) -> JobRecord | None:
        """Job ``job_id``; with ``tenant_id``, only when it belongs to that tenant."""
        if tenant_id is None:
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        else:
            row = self._one("SELECT * FROM jobs WHERE id = ? AND tenant_id = ?", (job_id, tenant_id))
        return self._job(row) if row else None

    def list_jobs(self, tenant_id: str | None = None, statuses: tuple[str, ...] | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if tenant_id is not None:
            sql += " AND tenant_id = ?"
            args.append(tenant_id)
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        return [self._job(r) for r in self._all(sql + " ORDER BY created", tuple(args))]

    def update_job(self, job_id: str, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set the job's fields; with ``only_if``, only while its status is one of those (atomically: a cancel
        from the API between the worker's read and its write wins). Returns whether the job was updated."""
        allowed = {"status", "step", "checkpoint_step", "resumed_from", "error", "started", "finished", "result"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update job fields {sorted(bad)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        sql, args = f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id]
        if only_if:
            sql += f" AND status IN ({','.join('?' * len(only_if))})"
            args += list(only_if)
        with self._tx() as db:
            return db.execute(sql, tuple(args)).rowcount > 0

    def usage(self, tenant_id: str) -> int:
        """Bytes the tenant's uploads and trained adapters take on disk."""
        files = sum(f.size for f in self.list_files(tenant_id))
        adapters = sum(p.stat().st_size for j in self.list_jobs(tenant_id) for p in self.adapter_dir(j.id).glob("*")
                       if p.is_file())
        return files + adapters

    def delete_job(self, job_id: str, compute: int = 0) -> None:
        """Forget a job: its metrics, its record, its folder (checkpoints and adapter). ``compute``: what it
        trained, kept on its tenant's account (deleting a job gives none of the compute quota back)."""
        with self._tx() as db:
            db.execute("UPDATE tenants SET deleted_compute = deleted_compute + ? WHERE id = "
                       "(SELECT tenant_id FROM jobs WHERE id = ?)", (int(compute), job_id))
            db.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def adapter_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "adapter"

    # -- metrics -----------------------------------------------------------------------------------------
    def add_metrics(self, job_id: str, step: int, values: dict[str, float]) -> None:
        """Log ``values`` at ``step``; a non-finite value is left out (SQLite would store NaN as NULL)."""
        now = time.time()
        rows = [(job_id, step, k, float(v), now) for k, v in values.items() if math.isfinite(float(v))]
        with self._tx() as db:
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", rows)

    def truncate_metrics(self, job_id: str, after_step: int) -> None:
        """Drop metrics logged after ``after_step`` (a resumed job repeats those steps from its checkpoint)."""
        with self._tx() as db:
            db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", (job_id, after_step))

    def metric_total(self, job_id: str, name: str) -> float | None:
        """The sum of metric ``name`` over the job's steps (None when it was never logged)."""
        return self._all("SELECT SUM(value) AS total FROM metrics WHERE job_id = ? AND name = ?",
                         (job_id, name))[0]["total"]

    def metrics(self, job_id: str, since_step: int = -1, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT step, name, value, time FROM metrics WHERE job_id = ? AND step > ? ORDER BY step, rowid LIMIT ?",
            (job_id, since_step, limit),
        )
        return [dict(r) for r in rows]
