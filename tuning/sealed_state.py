"""Tune's saved state, sealed: ``Tuner.restore`` unpickles the files of a sweep folder, so
``--resume`` hands Tune only files that this sweep itself left there.

When a sweep's ``tuner.fit()`` returns (finished or interrupted), every file under its folder is
listed with its sha256 in ``dard-sealed-state.json`` there, and the sha256 of that list is tagged on
the sweep's MLflow parent run: the tracking store, not the folder, holds the reference. Before a
resume, the list must match the tag and every file its entry; a file added, changed or removed
(a ``tuner.pkl`` replaced by a pickle that runs code, say) refuses the resume with one line,
before Tune reads anything. A sweep killed before it could seal its state cannot be resumed.
"""
from __future__ import annotations

import hashlib
import json

from dard.files import listing, read_bytes, within, write_bytes

SEAL_FILE = "dard-sealed-state.json"
SEAL_TAG = "dard.sealed_state_sha256"
# top-level files that are not Tune's state: dard's own log (appended to), the best trial's model
UNSEALED = {SEAL_FILE, "dard.log", "best-model.pt"}


def _listing(folder: str) -> dict[str, str]:
    return {name: digest for name, digest in listing(folder).items() if name not in UNSEALED}


def _digest(listing: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def seal(folder: str, client, run_id: str) -> None:
    """List every state file of ``folder`` (a path or storage URI) with its sha256; tag the list's
    digest on ``run_id``."""
    files = _listing(folder)
    write_bytes(within(folder, SEAL_FILE), json.dumps(files, indent=1, sort_keys=True).encode())
    client.set_tag(run_id, SEAL_TAG, _digest(files))


def check_sealed(folder: str, client, run_id: str) -> None:
    """ValueError unless ``folder`` holds exactly the files :func:`seal` recorded for ``run_id``."""
    start_anew = "start a new sweep (another --name)"
    expected = client.get_run(run_id).data.tags.get(SEAL_TAG)
    if not expected:
        raise ValueError(f"{folder}: this sweep's state was never sealed (it was killed before it could save it); "
                         f"it cannot be resumed safely: {start_anew}")
    try:
        recorded = json.loads(read_bytes(within(folder, SEAL_FILE)))
    except (OSError, ValueError) as err:
        raise ValueError(f"{within(folder, SEAL_FILE)}: unreadable ({err}); {start_anew}") from err
    if not isinstance(recorded, dict) or _digest(recorded) != expected:
        raise ValueError(f"{within(folder, SEAL_FILE)}: not the list this sweep sealed (its digest differs from the "
                         f"tracking store's); refusing to resume: {start_anew}")
    found = _listing(folder)
    changed = sorted(set(found) ^ set(recorded)) + sorted(k for k in found if k in recorded and found[k] != recorded[k])
    if changed:
        raise ValueError(f"{folder}: {len(changed)} file(s) changed, added or removed since the sweep stopped "
                         f"(first: {changed[0]}); Tune would unpickle them, so the resume is refused: {start_anew}")
