"""Uploads through the API: each file judged alone by the web form's validation (scans.uploads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile

from scans.models import Scan
from scans.uploads import UploadRejected, clean_filename, create_scan_from_upload


@dataclass(frozen=True)
class Rejection:
    index: int  # 0-based position of the file in the request
    filename: str
    message: str  # for a person


@dataclass(frozen=True)
class UploadOutcome:
    scans: list[Scan]
    rejections: list[Rejection]


def upload_scans(
    *, owner: AbstractBaseUser, files: Sequence[UploadedFile], options: dict[str, Any], priority: int
) -> UploadOutcome:
    """One queued scan per accepted file, in order; a rejected file leaves no row and no file and
    does not stop the others."""
    scans, rejections = [], []
    for index, uploaded in enumerate(files):
        try:
            scans.append(create_scan_from_upload(owner=owner, uploaded_file=uploaded, options=options, priority=priority))
        except UploadRejected as exc:
            rejections.append(Rejection(index, clean_filename(uploaded.name or ""), str(exc)))
    return UploadOutcome(scans, rejections)
