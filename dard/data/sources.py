"""Your own images: a folder (torchvision's ImageFolder: one sub-folder per class) or a table
(Parquet or Arrow IPC: an image column of encoded bytes or paths, a label column), on a local disk
or any pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``).

A source is *listed* once (:func:`list_source`: names, sizes and labels, no image read) and the
listing's digest pins it; images are decoded only where they are used (:class:`SourceDataset`):
a precompute task decodes its part, validation its first ``eval_limit`` images. Samples are
ordered by file name, then class (a folder) or by row (a table), so numbering files by index fixes
the order. Every problem with a source is a :class:`SourceError` naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from dard.data.arrays import Dataset
from dard.files import is_uri, resolve

# torchvision's ImageFolder extensions; other files are not samples
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes stored as one channel; the others as RGB
_READERS = 8  # threads fetching bytes (object storage latency), per process


class SourceError(ValueError):
    """A source that cannot be used as it is; the message names the file and what to do."""


def parse(spec: str) -> tuple[str, str]:
    """``folder:PATH`` / ``table:PATH`` -> (kind, location: a URI or an absolute local path)."""
    kind, _, location = spec.partition(":")
    if kind not in ("folder", "table") or not location:
        raise SourceError(f"{spec!r}: expected folder:PATH or table:PATH")
    return kind, location if is_uri(location) else resolve(location)[1]


@dataclass
class Listing:
    """What a source holds, without its pixels. ``keys[i]``: sample i's file (relative to the
    folder) or ``FILE#ROW`` of a table; ``sizes[i]``: its bytes (-1: unknown until read);
    ``labels[i]``: class index, -1 without one; ``classes``: class names in label order."""

    spec: str
    kind: str
    root: str
    keys: list[str]
    sizes: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    table: "_Table | None" = field(default=None, repr=False)
    rows: np.ndarray | None = None  # a table's: each sample's global row

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, positions: np.ndarray) -> "Listing":
        """The listing of ``positions`` alone (what a task that reads them needs to carry)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = (np.arange(len(self.keys)) if self.rows is None else self.rows)[positions] if self.kind == "table" else None
        return Listing(self.spec, self.kind, self.root, [self.keys[i] for i in positions.tolist()],
                       self.sizes[positions], self.labels[positions], self.classes, self.table, rows)

    def digest(self) -> str:
        """sha256 of what the listing says: every sample's name, size and label, and the classes."""
        h = hashlib.sha256(f"{self.kind}\n{'/'.join(self.classes)}\n".encode())
        for key, size, label in zip(self.keys, self.sizes.tolist(), self.labels.tolist()):
            h.update(f"{key}\t{size}\t{label}\n".encode())
        if self.table is not None:
            h.update(self.table.signature.encode())
        return h.hexdigest()

    def where(self, i: int) -> str:
        """Sample ``i`` as a person finds it: a file path or URI, or a table row."""
        return f"{self.root.rstrip('/')}/{self.keys[i]}" if self.kind == "folder" else f"{self.keys[i]} ({self.spec})"

    def read_bytes(self, positions: np.ndarray) -> list[bytes]:
        """The encoded images at ``positions``, fetched by a few threads (object storage latency)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.kind == "table":
            positions = positions if self.rows is None else self.rows[positions]
            if not self.table.paths:
                return self.table.read(positions)
        fs, root = resolve(self.root)
        # a folder's file: its path and its listed name, never parsed together as a URI (a name may
        # hold ' ', '#', '%'); a table's: the path its row gives
        paths = ([f"{root}/{self.keys[int(i)]}" for i in positions] if self.kind == "folder"
                 else [self.table.path_of(int(i)) for i in positions])

        def fetch(path: str) -> bytes:
            try:
                with fs.open_input_stream(path) as f:
                    return f.read()
            except (OSError, pa.ArrowException) as err:
                raise SourceError(f"{path}: cannot be read ({err}); check the source is still there") from err

        if len(paths) < 4:
            return [fetch(p) for p in paths]
        with ThreadPoolExecutor(_READERS) as pool:
            return list(pool.map(fetch, paths))


def list_source(spec: str, *, labeled: bool = True, image_column: str = "image", label_column: str = "label",
                classes: tuple[str, ...] | None = None) -> Listing:
    """List a source (no image is decoded). ``labeled``: every sample needs a class (a pool's need
    none: a folder of images alone, a table without a label column); ``classes``: the label order
    to use (a test set follows its training set's; a class only it has is an error)."""
    kind, location = parse(spec)
    if kind == "folder":
        return _list_folder(spec, location, labeled, classes)
    return _list_table(spec, location, labeled, image_column, label_column, classes)


def split_folders(spec: str) -> tuple[str, str] | None:
    """``folder:X`` whose sub-folders are ``train`` and ``test`` (each one folder per class) ->
    (``folder:X/train``, ``folder:X/test``); else None."""
    kind, location = parse(spec)
    if kind != "folder":
        return None
    fs, root = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, pa.ArrowException):
        return None
    dirs = {i.base_name for i in infos if i.type == pafs.FileType.Directory}
    files = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
    if {"train", "test"} <= dirs and not files and dirs <= {"train", "test"}:
        base = spec.rstrip("/")
        return f"{base}/train", f"{base}/test"
    return None


def _list_folder(spec: str, root: str, labeled: bool, classes: tuple[str, ...] | None) -> Listing:
    fs, local = resolve(root)
    info = fs.get_file_info(local)
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"{spec}: {root} is not a folder" + (" (it does not exist)" if info.type == pafs.FileType.NotFound
                                                               else ""))
    infos = fs.get_file_info(pafs.FileSelector(local, recursive=True))
    base = local.rstrip("/") + "/"
    images, folders, others = [], set(), []
    for i in infos:
        rel = i.path[len(base):] if i.path.startswith(base) else i.path
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
        if i.type == pafs.FileType.Directory:
            if "/" not in rel:
                folders.add(rel)
        elif rel.lower().endswith(IMAGE_EXTENSIONS):
            images.append((rel, i.size))
        else:
            others.append(rel)
    if others:
        raise SourceError(f"{spec}: {base}{others[0]} is not an image ({', '.join(IMAGE_EXTENSIONS)}); "
                          f"move it and the {len(others) - 1} other such files out of the folder" if len(others) > 1 else
                          f"{spec}: {base}{others[0]} is not an image ({', '.join(IMAGE_EXTENSIONS)}); move it out of the folder")
    if not images:
        raise SourceError(f"{spec}: no images in {root} (" + ("one sub-folder of images per class" if labeled else
                                                             "images, or sub-folders of images") + " expected)")
    if not labeled:
        images.sort(key=lambda e: (e[0].rsplit("/", 1)[-1], e[0]))
        return Listing(spec, "folder", root, [k for k, _ in images], np.array([s for _, s in images], dtype=np.int64),
                       np.full(len(images), -1, dtype=np.int64), ())
    loose = [rel for rel, _ in images if "/" not in rel]
    if loose:
        raise SourceError(f"{spec}: {base}{loose[0]} is not in a class folder; put every image in the sub-folder of "
                          "its class (torchvision's ImageFolder layout)")
    found = sorted({rel.split("/", 1)[0] for rel, _ in images})
    empty = sorted(folders - set(found))
    if empty:
        raise SourceError(f"{spec}: the class folder {base}{empty[0]} holds no image; add its images or remove it")
    order = classes if classes is not None else tuple(found)
    extra = [c for c in found if c not in order]
    if extra:
        raise SourceError(f"{spec}: the class folder {base}{extra[0]} is not a class of the training set "
                          f"({', '.join(order)}); remove it or add the class to the training images")
    index = {c: i for i, c in enumerate(order)}
    # by file name, then class: files named by their index keep that order across class folders
    images.sort(key=lambda e: (e[0].split("/", 1)[1], e[0].split("/", 1)[0]))
    return Listing(spec, "folder", root, [k for k, _ in images], np.array([s for _, s in images], dtype=np.int64),
                   np.array([index[k.split("/", 1)[0]] for k, _ in images], dtype=np.int64), tuple(order))


# ---- tables --------------------------------------------------------------------------------------

@dataclass
class _Table:
    """A Parquet file, a folder of Parquet files, or an Arrow IPC file: where each row lives."""

    spec: str
    fs: pafs.FileSystem
    files: list[str]
    fmt: str  # parquet | arrow
    starts: np.ndarray  # first global row of each file
    groups: list[np.ndarray]  # per file: first row (within the file) of each row group / record batch
    image_column: str
    paths: list[str] | None  # the image column holds paths: resolved per row
    signature: str

    def locate(self, rows: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """(file, group, positions in ``rows``, rows within that group) for every group touched."""
        out = []
        file_of = np.searchsorted(self.starts, rows, side="right") - 1
        for f in np.unique(file_of):
            at = np.flatnonzero(file_of == f)
            local = rows[at] - self.starts[f]
            group_of = np.searchsorted(self.groups[f], local, side="right") - 1
            for g in np.unique(group_of):
                sel = np.flatnonzero(group_of == g)
                out.append((int(f), int(g), at[sel], local[sel] - self.groups[f][g]))
        return out

    def read(self, rows: np.ndarray) -> list[bytes]:
        out: list[bytes | None] = [None] * len(rows)
        for f, g, at, within in self.locate(rows):
            column = self._group(f, g).column(self.image_column)
            values = column.take(pa.array(within)).to_pylist()
            for a, v in zip(at.tolist(), values):
                if v is None:
                    raise SourceError(f"{self.files[f]} row {int(self.starts[f] + self.groups[f][g] + within[0])}: "
                                      f"no image in column {self.image_column!r}; remove the row")
                out[a] = v
        return out

    def _group(self, f: int, g: int) -> pa.Table:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            with self.fs.open_input_file(self.files[f]) as src:
                return pq.ParquetFile(src).read_row_group(g, columns=[self.image_column])
        with self.fs.open_input_file(self.files[f]) as src:
            return pa.Table.from_batches([pa.ipc.open_file(src).get_batch(g)])

    def path_of(self, row: int) -> str:
        path = self.paths[row]
        if is_uri(path) or path.startswith("/"):
            return resolve(path)[1]
        file = self.files[int(np.searchsorted(self.starts, row, side="right") - 1)]
        return file.rsplit("/", 1)[0] + "/" + path


def _list_table(spec: str, location: str, labeled: bool, image_column: str, label_column: str,
                classes: tuple[str, ...] | None) -> Listing:
    import pyarrow.parquet as pq

    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{spec}: {location} does not exist")
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
        if not files:
            raise SourceError(f"{spec}: no .parquet files in {location}")
    else:
        files = [path]
    fmt = "arrow" if files[0].endswith((".arrow", ".feather", ".ipc")) else "parquet"
    schemas, counts, groups, labels_parts, paths, signature = [], [], [], [], [], []
    for file in files:
        try:
            with fs.open_input_file(file) as src:
                if fmt == "parquet":
                    meta = pq.ParquetFile(src)
                    schema = meta.schema_arrow
                    sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
                    wanted = [c for c in (label_column if labeled or label_column in schema.names else None,
                                          image_column if _is_text(schema, image_column) else None) if c]
                    cols = meta.read(columns=wanted) if wanted else None
                else:
                    reader = pa.ipc.open_file(src)
                    schema = reader.schema
                    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                    sizes = [b.num_rows for b in batches]
                    cols = pa.Table.from_batches(batches, schema) if batches else schema.empty_table()
        except (OSError, pa.ArrowException) as err:
            raise SourceError(f"{spec}: {file} is not a readable {fmt} table ({err})") from err
        if image_column not in schema.names:
            raise SourceError(f"{spec}: {file} has no column {image_column!r} (columns: {', '.join(schema.names)}); "
                              "name the image column with data.image_column")
        kind = schema.field(image_column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_text(schema, image_column)):
            raise SourceError(f"{spec}: column {image_column!r} of {file} is {kind}; it must hold encoded images "
                              "(binary) or their paths (string)")
        if labeled and label_column not in schema.names:
            raise SourceError(f"{spec}: {file} has no column {label_column!r} (columns: {', '.join(schema.names)}); "
                              "name the label column with data.label_column")
        schemas.append(schema)
        counts.append(sum(sizes))
        groups.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64))
        if labeled:
            labels_parts.append(cols.column(label_column).combine_chunks())
        if _is_text(schema, image_column):
            paths += cols.column(image_column).to_pylist()
        signature.append(f"{file}\t{fs.get_file_info(file).size}\t{sum(sizes)}")
    total = int(sum(counts))
    if total == 0:
        raise SourceError(f"{spec}: the table has no rows")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if labeled:
        raw = pa.chunked_array(labels_parts)
        labels, order = _table_labels(spec, raw, label_column, classes)
    else:
        labels, order = np.full(total, -1, dtype=np.int64), ()
    table = _Table(spec, fs, files, fmt, starts, groups, image_column, paths or None, "\n".join(signature))
    keys = [f"{files[int(np.searchsorted(starts, r, side='right') - 1)].rsplit('/', 1)[-1]}#{r - starts[int(np.searchsorted(starts, r, side='right') - 1)]}"
            for r in range(total)]
    return Listing(spec, "table", location, keys, np.full(total, -1, dtype=np.int64), labels, order, table)


def _is_text(schema: pa.Schema, column: str) -> bool:
    return column in schema.names and (pa.types.is_string(schema.field(column).type)
                                       or pa.types.is_large_string(schema.field(column).type))


def _table_labels(spec: str, raw: pa.ChunkedArray, column: str, classes: tuple[str, ...] | None
                  ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and names from a label column of names (sorted) or of indices (``0..K-1``)."""
    if raw.null_count:
        raise SourceError(f"{spec}: {raw.null_count} rows have no {column!r}; label them or drop them")
    kind = raw.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        names = [str(v) for v in raw.to_pylist()]
        order = classes if classes is not None else tuple(sorted(set(names)))
        extra = sorted(set(names) - set(order))
        if extra:
            raise SourceError(f"{spec}: class {extra[0]!r} is not a class of the training set ({', '.join(order)}); "
                              "remove its rows or add the class to the training table")
        index = {c: i for i, c in enumerate(order)}
        return np.array([index[n] for n in names], dtype=np.int64), tuple(order)
    if not pa.types.is_integer(kind):
        raise SourceError(f"{spec}: column {column!r} is {kind}; labels are class indices (integers) or class names")
    values = raw.to_numpy().astype(np.int64)
    if values.min() < 0:
        raise SourceError(f"{spec}: column {column!r} holds {values.min()}; class indices start at 0")
    order = classes if classes is not None else tuple(str(c) for c in range(int(values.max()) + 1))
    if values.max() >= len(order):
        raise SourceError(f"{spec}: class index {values.max()} is not a class of the training set "
                          f"(0..{len(order) - 1}); remove those rows or add the class to the training table")
    return values, tuple(order)


# ---- decoding ------------------------------------------------------------------------------------

def channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def decode(data: bytes, where: str, shape: tuple[int, int, int], resize: bool, convert: bool) -> np.ndarray:
    """One encoded image -> uint8 (C, H, W) of ``shape``. Resized (bilinear) only when ``resize``
    (``data.image_size`` set), converted only when ``convert`` (``data.channels`` set); otherwise an
    image of another size or channel count is a :class:`SourceError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SourceError(f"{where}: not a readable image ({type(err).__name__}: {err}); replace or remove it") from err
    found = channels_of(img.mode)
    if found != c and not convert:
        raise SourceError(f"{where}: has {found} channel(s) ({img.mode}) while the source's images have {c}; "
                          f"set data.channels (--set data.channels={c}) to convert every image")
    if img.mode != ("L" if c == 1 else "RGB"):
        img = img.convert("L" if c == 1 else "RGB")
    if (img.height, img.width) != (h, w):
        if not resize:
            raise SourceError(f"{where}: is {img.height}x{img.width} while the source's images are {h}x{w}; "
                              f"set data.image_size (--image-size H,W) to resize every image")
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def first_shape(listing: Listing, image_size: tuple[int, int] | None, channels: int | None) -> tuple[int, int, int]:
    """(C, H, W) a source's images are stored at: ``channels``/``image_size`` where given, else
    those of its first image."""
    from PIL import Image, UnidentifiedImageError

    data = listing.read_bytes(np.array([0]))[0]
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise SourceError(f"{listing.where(0)}: not a readable image ({err}); replace or remove it") from err
    return (channels or channels_of(img.mode), *(image_size or (img.height, img.width)))


@dataclass
class SourceDataset(Dataset):
    """A split of a source: ``positions`` into its listing, decoded on demand (:meth:`read`)."""

    listing: Listing
    positions: np.ndarray
    labels: torch.Tensor
    shape: tuple[int, int, int]
    resize: bool
    convert: bool
    num_classes: int
    name: str
    _all: torch.Tensor | None = field(default=None, repr=False)

    def read(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self._all is not None:
            return self._all[torch.from_numpy(idx)]
        at = self.positions[idx]
        out = np.empty((len(at), *self.shape), dtype=np.uint8)
        for k, data in enumerate(self.listing.read_bytes(at)):
            out[k] = decode(data, self.listing.where(int(at[k])), self.shape, self.resize, self.convert)
        return torch.from_numpy(out)

    @property
    def images(self) -> torch.Tensor:
        if self._all is None:
            self._all = self.read(np.arange(len(self)))
        return self._all

    def compact(self) -> "SourceDataset":
        """The same samples with a listing of just them: small enough to ship to a task."""
        return SourceDataset(self.listing.take(self.positions), np.arange(len(self.positions)), self.labels, self.shape,
                             self.resize, self.convert, self.num_classes, self.name, self._all)

    def subset(self, idx: torch.Tensor | np.ndarray) -> "SourceDataset":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return SourceDataset(self.listing, self.positions[idx], self.labels[torch.from_numpy(idx)], self.shape,
                             self.resize, self.convert, self.num_classes, self.name,
                             None if self._all is None else self._all[torch.from_numpy(idx)])
