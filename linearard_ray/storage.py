"""Small files on local disk or object storage (s3://, gs://) through pyarrow filesystems: run
records, failure markers and sweep results that several processes and nodes read."""

from __future__ import annotations


def is_uri(path: str) -> bool:
    return "://" in path


def fs_and_path(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def read_text(path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    import pyarrow.fs as pafs

    fs, p = fs_and_path(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write (replace) the file, creating its directory."""
    fs, p = fs_and_path(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())
