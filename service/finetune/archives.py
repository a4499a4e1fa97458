"""Safe reading of ImageFolder archives (``<label>/<name>.png``) uploaded for fine-tuning.

Refuses absolute paths and ``..`` components, ignores links and special files, and caps the
member count and the total uncompressed size (checked against the headers *and* against
the bytes actually read, so a lying zip header cannot inflate past the cap). Every entry counts
against the member cap, skipped ones too (hidden files, folders, links), and reading stops at
the cap. Reading is synchronous: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath

from service.http.errors import ClientError, echo
from service.http.labels import parse_label

IGNORED_PARTS = ("__MACOSX",)
CENTRAL_DIRECTORY_ENTRY = b"PK\x01\x02"  # the signature every zip central-directory entry starts with
ZIP64_RECORDS = zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator


class ArchiveLimits:
    def __init__(self, max_members: int, max_total_bytes: int) -> None:
        self.max_members = max_members
        self.max_total_bytes = max_total_bytes


def _check_name(name: str) -> PurePosixPath | None:
    """The member's path, or None to skip it (hidden or resource-fork files)."""
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise ClientError(422, "unsafe_archive", f"archive member {echo(name)} has an absolute path")
    path = PurePosixPath(name.replace("\\", "/"))
    if ".." in path.parts:
        raise ClientError(422, "unsafe_archive", f"archive member {echo(name)} escapes the archive with '..'")
    if any(part in IGNORED_PARTS or part.startswith(".") for part in path.parts):
        return None
    return path


def _label_of(path: PurePosixPath) -> int:
    return parse_label(path.parent.name, f"the folder of archive member {echo(str(path))} (layout <label>/<name>.png)")


class _Budget:
    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits, self.members, self.total = limits, 0, 0

    def count(self) -> None:
        """Every entry counts, whether it is read or skipped (a folder, a link, a hidden file)."""
        self.members += 1
        self.check_count(self.members)

    def check_count(self, entries: int) -> None:
        if entries > self.limits.max_members:
            raise ClientError(413, "archive_too_large",
                              f"the archive has more than {self.limits.max_members:,} entries "
                              "(files, folders and links all count)")

    def admit(self, declared_size: int) -> None:
        if self.total + declared_size > self.limits.max_total_bytes:
            raise ClientError(413, "archive_too_large",
                              f"the archive uncompresses to more than {self.limits.max_total_bytes:,} bytes")

    def read(self, stream, name: str) -> bytes:
        remaining = self.limits.max_total_bytes - self.total
        data = stream.read(remaining + 1)
        if len(data) > remaining:
            raise ClientError(413, "archive_too_large",
                              f"the archive uncompresses to more than {self.limits.max_total_bytes:,} bytes "
                              f"(at {echo(name)})")
        self.total += len(data)
        return data


def _central_directory_entries(data: bytes) -> int:
    """At least as many entries as the zip's central directory holds (their signatures, counted
    in C): ZipFile parses every entry into an object before anything could count them."""
    try:
        end = zipfile._EndRecData(io.BytesIO(data))  # the end-of-central-directory record, zip64 too
    except OSError:
        end = None
    if not end:
        return 0  # not a zip: ZipFile names the problem
    location = end[zipfile._ECD_LOCATION]
    return data.count(CENTRAL_DIRECTORY_ENTRY, max(0, location - end[zipfile._ECD_SIZE] - ZIP64_RECORDS), location)


def _zip_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, int, bytes]]:
    budget.check_count(_central_directory_entries(data))
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ClientError(422, "corrupt_archive", f"the zip archive could not be read: {exc}") from None
    with archive:
        for info in archive.infolist():
            budget.count()
            path = _check_name(info.filename)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if path is None or info.is_dir() or is_link:
                continue
            budget.admit(info.file_size)
            try:
                with archive.open(info) as stream:
                    content = budget.read(stream, info.filename)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
                raise ClientError(422, "corrupt_archive", f"archive member {echo(info.filename)}: {exc}") from None
            yield str(path), _label_of(path), content


def _tar_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, int, bytes]]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ClientError(422, "corrupt_archive", f"the tar archive could not be read: {exc}") from None
    with archive:
        try:
            for member in archive:
                budget.count()  # before the next header is read: reading stops at the cap
                path = _check_name(member.name)
                if path is None or not member.isfile():  # links, devices, fifos, directories
                    continue
                budget.admit(member.size)
                stream = archive.extractfile(member)
                if stream is None:
                    continue
                yield str(path), _label_of(path), budget.read(stream, member.name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ClientError(422, "corrupt_archive", f"the tar archive is corrupt: {exc}") from None


def read_image_folder(data: bytes, filename: str, limits: ArchiveLimits) -> list[tuple[str, int, bytes]]:
    """[(member name, label, image bytes)] from a .zip or .tar.gz in ImageFolder layout."""
    budget = _Budget(limits)
    name = filename.lower()
    if name.endswith(".zip") or data[:4] == b"PK\x03\x04":
        members = list(_zip_members(data, budget))
    elif name.endswith((".tar.gz", ".tgz", ".tar")) or data[:2] == b"\x1f\x8b":
        members = list(_tar_members(data, budget))
    else:
        raise ClientError(415, "unsupported_archive", f"{echo(filename)} is not a .zip or .tar.gz archive")
    if not members:
        raise ClientError(422, "empty_archive", "the archive holds no images in <label>/<name>.png layout")
    return members
