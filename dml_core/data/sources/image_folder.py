"""An image folder: `<root>/<class_name>/<any/depth/image.ext>`, local or s3:// (through storage.py).

Files whose extension is not an image extension are listed as bad items (an error in raise mode, a
recorded skip in skip mode), never dropped silently. An empty class folder is a bad item too.
The fingerprint hashes every file's content (one full read), so a changed image makes a new version.
"""
from __future__ import annotations

import hashlib

from dml_core import storage
from dml_core.data.sources.base import IMAGE_FILE_SUFFIXES, ItemError, ItemRef, Source, SourceError, sha256_file


class ImageFolderSource(Source):
    kind = "image_folder"

    def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_FILE_SUFFIXES) -> None:
        self.root = str(root).rstrip("/")
        self.extensions = tuple(e.lower() for e in extensions)
        self._fs, self._path = storage.filesystem(self.root)
        self._items: list[ItemRef] | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root, "extensions": list(self.extensions)}

    def list_items(self) -> list[ItemRef]:
        if self._items is None:
            self._items = self._scan()
        return self._items

    def _scan(self) -> list[ItemRef]:
        if not self._fs.isdir(self._path):
            raise SourceError(f"image folder {self.root} does not exist or is not a folder")
        entries = self._fs.ls(self._path, detail=True)
        class_dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
        stray = sorted(e["name"] for e in entries if e["type"] != "directory")
        items = [ItemRef(self._rel(p), "", error="file outside any class folder") for p in stray]
        for d in class_dirs:
            class_name = d.rstrip("/").rsplit("/", 1)[-1]
            files = sorted(self._fs.find(d))
            if not files:
                items.append(ItemRef(self._rel(d) + "/", class_name, error="empty class folder"))
            for f in files:
                ext = "." + f.rsplit(".", 1)[-1].lower() if "." in f.rsplit("/", 1)[-1] else ""
                error = None if ext in self.extensions else f"not an image file (extension {ext or 'none'!r})"
                items.append(ItemRef(self._rel(f), class_name, error=error))
        if not any(i.error is None for i in items):
            raise SourceError(f"image folder {self.root} holds no image files in class subfolders")
        return items

    def _rel(self, path: str) -> str:
        return path[len(self._path.rstrip("/")) + 1:]

    def load(self, item: ItemRef) -> bytes:
        try:
            with self._fs.open(f"{self._path}/{item.ref}", "rb") as f:
                return f.read()
        except OSError as e:
            raise ItemError(f"{self.root}/{item.ref}: cannot read ({e})") from e

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"image_folder\0")
        for item in self.list_items():
            try:
                content = "" if item.error else sha256_file(self._fs, f"{self._path}/{item.ref}")
            except OSError as e:  # reported by load() when the item is sharded
                content = f"unreadable: {e}"
            h.update(f"{item.ref}\0{item.class_name}\0{item.error or ''}\0{content}\n".encode())
        return h.hexdigest()
