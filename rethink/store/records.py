"""Moving run records between stores: `rethink export` writes finished runs into one archive, `rethink import`
checks and adds them to another store. This is how a GPU machine's results reach the repository's `results/`.

An archive is a .tar.gz of

    manifest.json                  format, what it holds, and the sha256 of every file below
    runs/<run_id>/spec.json        the run's records, byte for byte as in the source store
    runs/<run_id>/metrics.jsonl
    runs/<run_id>/result.json
    partial/<run_id>/...           optional: spec.json, metrics.jsonl and checkpoint.pt of a run left partial,
                                   so that another machine can resume it (never imported into a results store
                                   unless asked: checkpoints do not belong in the repository)

A record is accepted only when its spec hashes to its run id, its result names that run and spec, and every
file matches the manifest; an import adds nothing unless every record in it is acceptable (all or nothing).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field

from rethink.errors import UserError
from rethink.spec import RunSpec
from rethink.store.base import Store
from rethink.store.runs import RECORD_FILES, run_dir, run_key

FORMAT = "rethink-records-1"
PARTIAL_FILES = ("spec.json", "metrics.jsonl", "checkpoint.pt")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_run_ids(store: Store) -> list[str]:
    """Every run of the store that has a result.json, sorted."""
    return sorted({k.split("/")[1] for k in store.list("runs/") if k.endswith("/result.json") and k.count("/") == 2})


def check_record(run_id: str, files: dict[str, bytes]) -> str | None:
    """Why a finished run's record cannot be accepted, or None when it can."""
    missing = [n for n in RECORD_FILES if n not in files]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        spec = RunSpec.from_json(files["spec.json"].decode())
    except (UserError, UnicodeDecodeError) as e:
        return f"spec.json is not a valid run spec ({e})"
    if spec.run_id != run_id:
        return f"its spec hashes to {spec.run_id}, not to its run id {run_id} (edited or misplaced)"
    try:
        result = json.loads(files["result.json"])
        for line in files["metrics.jsonl"].decode().splitlines():
            if line.strip():
                json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return f"damaged result.json or metrics.jsonl ({e})"
    if not isinstance(result, dict) or result.get("run_id") != run_id:
        return "result.json belongs to another run"
    try:
        if RunSpec.from_dict(result.get("spec") or {}).run_id != run_id:
            return "result.json records another spec"
    except UserError as e:
        return f"result.json records an invalid spec ({e})"
    return None


# ---------------------------------------------------------------------------------------------- export


@dataclass
class Exported:
    path: str
    runs: list[str]
    partial: list[str] = field(default_factory=list)
    skipped_partial: list[str] = field(default_factory=list)  # partial runs whose checkpoints did not fit
    bytes: int = 0


def export(store: Store, out: str, run_ids: list[str] | None = None, partial_ids: list[str] = (),
           max_bytes: int | None = None, log=print, revision: str = "unknown") -> Exported:  # fmt: skip
    """Write the finished runs `run_ids` (default: every finished run of the store) into the archive `out`;
    then, while the archive stays under `max_bytes`, the checkpoints of the runs `partial_ids`. `revision`:
    the exporting code's revision, for the manifest."""
    ids = finished_run_ids(store) if run_ids is None else list(run_ids)
    entries: dict[str, bytes] = {}
    runs = []
    for rid in ids:
        files = {n: store.read_bytes(run_key(rid, n)) for n in RECORD_FILES}
        files = {n: b for n, b in files.items() if b is not None}
        problem = check_record(rid, files)
        if problem:
            raise UserError(f"cannot export run {rid} from {store.where(run_dir(rid))}: {problem}")
        runs.append(rid)
        entries.update({run_key(rid, n): b for n, b in files.items()})
    size = sum(len(b) for b in entries.values())
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"the records of {len(runs)} runs take {size / 2**20:.1f} MiB, more than the "
                        f"{max_bytes / 2**20:.1f} MiB allowed: export fewer runs (--suite, --only-models)")  # fmt: skip
    partial, skipped = [], []
    for rid in partial_ids:
        files = {n: store.read_bytes(run_key(rid, n)) for n in PARTIAL_FILES}
        if any(b is None for b in files.values()):
            continue  # nothing to resume from
        extra = sum(len(b) for b in files.values())
        if max_bytes is not None and size + extra > max_bytes * 0.97:  # room for the manifest and tar headers
            skipped.append(rid)
            continue
        size += extra
        partial.append(rid)
        entries.update({f"partial/{rid}/{n}": b for n, b in files.items()})
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": store.where(),
        "git": revision,
        "runs": runs,
        "partial": partial,
        "files": {name: _sha256(b) for name, b in sorted(entries.items())},
    }
    _write_tar(out, {"manifest.json": (json.dumps(manifest, indent=2) + "\n").encode(), **entries})
    total = len(open(out, "rb").read())
    log(f"exported {len(runs)} finished runs" + (f" and {len(partial)} partial runs' checkpoints" if partial else "")
        + f" to {out} ({total / 2**20:.2f} MiB)"
        + (f"; {len(skipped)} partial runs' checkpoints did not fit" if skipped else ""))  # fmt: skip
    return Exported(out, runs, partial, skipped, total)


def _write_tar(out: str, entries: dict[str, bytes]) -> None:
    """A deterministic .tar.gz (sorted names, fixed times), written to a temporary name and renamed."""
    import os

    tmp = f"{out}.tmp"
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in ["manifest.json", *sorted(n for n in entries if n != "manifest.json")]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(entries[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(entries[name]))
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------- import


@dataclass
class Imported:
    added: list[str]
    identical: list[str]
    partial: list[str]
    skipped_partial: list[str]


def _read_archive(path: str) -> tuple[dict, dict[str, bytes]]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {}
            for member in tar.getmembers():
                if not member.isfile():
                    raise UserError(f"{path}: unexpected entry {member.name!r} (not a regular file)")
                files[member.name] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise UserError(f"cannot read {path} as a rethink records archive ({type(e).__name__}: {e})") from None
    if "manifest.json" not in files:
        raise UserError(f"{path} has no manifest.json: not an archive written by rethink export")
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except ValueError as e:
        raise UserError(f"{path}: damaged manifest.json ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: unknown archive format {manifest.get('format') if isinstance(manifest, dict) else '?'}")
    return manifest, files


def import_archive(path: str, store: Store, with_checkpoints: bool = False, log=print) -> Imported:
    """Check every record of the archive, then add the new ones to `store`; refuse (adding nothing) when any
    record is damaged, tampered with, or differs from the record of that run already in the store."""
    manifest, files = _read_archive(path)
    listed = manifest.get("files") or {}
    unlisted = sorted(set(files) - set(listed))
    absent = sorted(set(listed) - set(files))
    if unlisted or absent:
        raise UserError(f"{path}: the manifest does not match the archive (not listed: {unlisted[:3]}, absent: "
                        f"{absent[:3]})")  # fmt: skip
    changed = sorted(n for n, b in files.items() if _sha256(b) != listed[n])
    if changed:
        raise UserError(f"{path}: refused, {len(changed)} files differ from their manifest checksums "
                        f"(e.g. {changed[0]}): the archive was altered after export")  # fmt: skip
    problems, added, identical = [], [], []
    for rid in manifest.get("runs") or []:
        record = {n: files.get(run_key(rid, n)) for n in RECORD_FILES}
        record = {n: b for n, b in record.items() if b is not None}
        problem = check_record(rid, record)
        if problem:
            problems.append(f"{rid}: {problem}")
            continue
        there = {n: store.read_bytes(run_key(rid, n)) for n in RECORD_FILES}
        if there["result.json"] is None:
            added.append(rid)
        elif all(there[n] == record[n] for n in RECORD_FILES):
            identical.append(rid)
        else:
            differ = [n for n in RECORD_FILES if there[n] != record[n]]
            problems.append(f"{rid}: differs from the finished record already in {store.where(run_dir(rid))} "
                            f"({', '.join(differ)})")  # fmt: skip
    if problems:
        raise UserError(f"{path}: refused, nothing imported: " + "; ".join(problems[:5])
                        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))  # fmt: skip
    for rid in added:  # spec first, result last: an interrupted import leaves unfinished runs, never a bad one
        for n in RECORD_FILES:
            store.write_bytes(run_key(rid, n), files[run_key(rid, n)])
    partial, skipped = [], []
    for rid in manifest.get("partial") or []:
        if not with_checkpoints or store.exists(run_key(rid, "result.json")):
            skipped.append(rid)
            continue
        for n in PARTIAL_FILES:
            store.write_bytes(run_key(rid, n), files[f"partial/{rid}/{n}"])
        partial.append(rid)
    log(f"imported {len(added)} runs into {store.where()}" + (f", {len(identical)} already there" if identical else "")
        + (f", {len(partial)} partial runs to resume" if partial else "")
        + (f"; {len(skipped)} partial runs' checkpoints not imported (--with-checkpoints)" if skipped and
           not with_checkpoints else ""))  # fmt: skip
    for rid in added:
        spec = RunSpec.from_json(files[run_key(rid, "spec.json")].decode())
        log(f"  added {rid} {spec.label()}")
    return Imported(added, identical, partial, skipped)
