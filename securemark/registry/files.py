"""The registry's files as bytes and back: :meth:`FilesMixin.files` reads the owner key, the database and
the kept base models into a dict by relative path, and :meth:`FilesMixin.from_files` writes such a dict into
a new folder (0700, every file 0600) and opens it. This is how a registry travels to the owner's own Ray
workers; nothing but the registry's own file names passes either way."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Self

from securemark.registry.bases import BASES_DIR
from securemark.registry.params import RegistryError
from securemark.registry.store import DB_NAME, KEY_NAME, Store

_FILE_NAMES = re.compile(rf"({re.escape(KEY_NAME)}|{re.escape(DB_NAME)}|{BASES_DIR}/[0-9a-f]{{64}}\.safetensors)")


class FilesMixin(Store):
    def files(self) -> dict[str, bytes]:
        """The registry's own files (owner key, database, kept bases) by relative path: a consistent copy, the
        WAL checkpointed into the database first (refused while another connection reads, which would leave
        recent writes out). It holds the owner secret: ship it only where the owner would keep the registry
        itself (an evaluation's throwaway registry on the owner's own Ray workers)."""
        busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RegistryError(f"{self.directory} is being read by another connection; copy it once that is done")
        bases = self.directory / BASES_DIR
        paths = [self.directory / KEY_NAME, self.directory / DB_NAME, *sorted(bases.glob("*.safetensors"))]
        names = {p.relative_to(self.directory).as_posix(): p for p in paths if p.is_file() and not p.is_symlink()}
        return {name: p.read_bytes() for name, p in names.items() if _FILE_NAMES.fullmatch(name)}  # no temp files

    @classmethod
    def from_files(cls, directory: str | Path, files: dict[str, bytes]) -> Self:
        """A registry written from :meth:`files` into ``directory`` (which must not exist; 0700, files 0600) and
        opened. Names other than the registry's own are refused before anything is written; a failure
        midway removes what was written."""
        directory = Path(directory)
        odd = [name for name in files if not _FILE_NAMES.fullmatch(name)]
        if odd or DB_NAME not in files or KEY_NAME not in files:
            raise RegistryError(f"not a registry's files: unexpected {odd} or {DB_NAME}/{KEY_NAME} missing")
        if directory.exists():
            raise RegistryError(f"{directory} already exists; a registry copy goes into a new folder")
        try:
            (directory / BASES_DIR).mkdir(parents=True, mode=0o700)
            directory.chmod(0o700)
            for name, content in files.items():
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
            return cls.open(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
