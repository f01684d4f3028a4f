"""Reading expert regions from flash: one ``pread`` per region, optionally with O_DIRECT, into
buffers this process owns (so resident bytes are what the budget counts, not page-cache pages of
a memory map). Also evicts a file from the page cache so benchmarks measure the disk.

Expert regions are aligned to the file's ``alignment`` (format/SPEC.md §6), so O_DIRECT reads
need only round the length up.
"""
from __future__ import annotations

import os
import threading

import numpy as np

PAGE = 4096
#: expert-region reads the engine keeps in flight by default (``--io-depth``; measured on the
#: 2-core VM's virtual disk with O_DIRECT: 1 MB reads 1.0 GB/s one at a time, 1.6 GB/s four at a
#: time; 2.6 MB reads 1.55 -> 1.77 GB/s)
IO_DEPTH = 4


def check_io_depth(value) -> int:
    """``value`` as a number of reads in flight; None gives the default :data:`IO_DEPTH`.

    Raises:
        ValueError: not an integer (bools and floats included) or below 1; names the option.
    """
    import numbers
    if value is None:
        return IO_DEPTH
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"io_depth (--io-depth) must be an integer of at least 1, got {value!r}")
    return int(value)


def aligned_empty(nbytes: int, align: int = PAGE) -> np.ndarray:
    """A uint8 [nbytes] array whose data pointer is a multiple of ``align`` (for O_DIRECT)."""
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


def anon_array(nbytes: int) -> np.ndarray:
    """A uint8 [nbytes] array in its own anonymous memory map (page-aligned).

    For long-lived buffers that are replaced one by one (cache slots): freeing one unmaps it,
    so its pages go back to the OS at once. Buffers from the C heap would leave holes that the
    heap keeps resident (measured: peak RSS 1.36x the budget with moving slots, 1.05x with
    this). The map is private (``MAP_PRIVATE | MAP_ANONYMOUS``): anonymous memory, as the
    heap's.
    """
    import mmap
    # private: shared anonymous maps are shmem, which a memory cgroup counts as page cache
    m = mmap.mmap(-1, max(int(nbytes), 1), flags=mmap.MAP_PRIVATE)
    return np.frombuffer(m, np.uint8)[:nbytes]


def evict_page_cache(path) -> bool:
    """Drop ``path``'s pages from the OS page cache (``posix_fadvise(DONTNEED)`` after ``fsync``).

    Returns False where the call is unavailable. Only clean pages are dropped; a file just
    written is synced first.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def release_heap() -> bool:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim(0)``).

    Loading leaves tens of MB of freed-but-resident heap behind (the tokenizer's JSON parse, the
    index, transient read buffers); a memory cgroup counts them until they are trimmed. A few
    milliseconds. Returns False where glibc is not available.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None


class ModelFileError(OSError):
    """A read of a model file failed, or the file changed while a model ran from it.

    The message names the file and says what happened (truncated, rewritten in place, or the
    system's read error with the offset); ``errno`` is the system's error number for a failed
    read, else None. Raised by :meth:`RegionReader.read`.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class RegionReader:
    """Reads byte ranges of one file with ``os.preadv`` (thread-safe: no shared file offset).

    Args:
        path: the file.
        direct: open with O_DIRECT (bypass the page cache; Linux). Offsets must be aligned to
            4096; lengths are rounded up internally.
        keep_cache: leave what a buffered read brought into the OS page cache there. Default
            False: each read's range is dropped right after (posix_fadvise DONTNEED), so the
            page cache does not become a second, unbudgeted expert cache (on the memory-limited
            devices this runtime targets it cannot hold the experts either, and under a memory
            cgroup the cached pages would push the runtime's own pages out), and every miss of
            a benchmark really reads the disk.

    Attributes:
        bytes_read: total bytes requested so far (for "bytes read per token").
        reads: number of reads.
        size: the file's size in bytes when it was opened.

    The file stays open until :meth:`close`: replacing it by a rename (or deleting it) does not
    affect the reads, which go on reading the file that was opened. Every read first checks
    (one ``fstat``, ~1 us) that the open file still has the size and modification time it had
    when opened: a file truncated, extended or rewritten in place is reported by the next read
    (:class:`ModelFileError`), instead of returning bytes of another file or, through a memory
    map, killing the process with SIGBUS.

    Raises:
        OSError: O_DIRECT not supported by the file system (the message says so).
    """

    def __init__(self, path, direct: bool = False, keep_cache: bool = False):
        self.path = path
        self.direct = direct
        self.drop = not direct and not keep_cache and hasattr(os, "posix_fadvise")
        flags = os.O_RDONLY
        if direct:
            if not hasattr(os, "O_DIRECT"):
                raise OSError(f"{path}: O_DIRECT is not available on this platform")
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            if direct:
                raise OSError(f"{path}: cannot open with O_DIRECT ({e.strerror})") from None
            raise
        st = os.fstat(self.fd)
        self.size = st.st_size
        self._mtime_ns = st.st_mtime_ns
        self.bytes_read = 0
        self.reads = 0
        self._lock = threading.Lock()

    def changed(self) -> str | None:
        """What changed in the open file since it was opened (``"truncated to N bytes"``, ...),
        or None if its size and modification time are as they were."""
        st = os.fstat(self.fd)
        if st.st_size < self.size:
            return f"truncated to {st.st_size} bytes (it had {self.size})"
        if st.st_size > self.size:
            return f"extended to {st.st_size} bytes (it had {self.size})"
        if st.st_mtime_ns != self._mtime_ns:
            return "rewritten in place (its modification time changed)"
        return None

    def check_unchanged(self) -> None:
        """Raise :class:`ModelFileError` if the open file changed since it was opened (see
        :meth:`changed`)."""
        what = self.changed()
        if what is not None:
            raise ModelFileError(f"{self.path}: the file was {what} while in use; a model file "
                                 f"must not be modified while a model runs from it (to update "
                                 f"it, write a new file and rename it over the old one)")

    def read(self, offset: int, size: int, alloc=aligned_empty) -> np.ndarray:
        """Read ``size`` bytes at ``offset`` into a new uint8 array (page-aligned memory).

        ``alloc(nbytes)`` makes the page-aligned buffer (default: from the C heap; see
        :func:`anon_array` for long-lived ones).

        Raises:
            ModelFileError: the file changed since it was opened (:meth:`check_unchanged`), a
                short read (the file is shorter than the index says), or a read error from the
                system (e.g. EIO; its errno kept); the message names the file and offset.
            OSError: an unaligned O_DIRECT offset.
        """
        self.check_unchanged()
        try:
            out = self._pread(offset, size, alloc)
        except ModelFileError:
            self.check_unchanged()     # truncated between the check and the read
            raise
        except OSError as e:
            if e.errno is None:
                raise
            raise ModelFileError(f"{self.path}: read error at byte {offset} ({size} bytes): "
                                 f"{e.strerror or e}", e.errno) from None
        with self._lock:
            self.bytes_read += size
            self.reads += 1
        return out

    def _pread(self, offset, size, alloc):
        if self.direct:
            if offset % PAGE:
                raise OSError(f"{self.path}: O_DIRECT read at unaligned offset {offset}")
            n = min(-(-size // PAGE) * PAGE, -(-(self.size - offset) // PAGE) * PAGE)
            buf = alloc(max(n, PAGE))
            got = os.preadv(self.fd, [buf], offset)
            if got < size:
                raise ModelFileError(f"{self.path}: short read at byte {offset}: {got} of "
                                     f"{size} bytes (the file is shorter than its index says)")
            return buf[:size]
        out = alloc(size)
        got = 0
        while got < size:
            k = os.preadv(self.fd, [out[got:]], offset + got)
            if k <= 0:
                raise ModelFileError(f"{self.path}: short read at byte {offset}: {got} of "
                                     f"{size} bytes (the file is shorter than its index says)")
            got += k
        if self.drop:
            os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_DONTNEED)
        return out

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class ReadQueue:
    """``n`` threads that run submitted reads, the most urgent first: a smaller ``priority``
    first, equal ones in submission order (the engine submits its demand reads at 0 and the
    reads of predicted experts at 1, engine/prefetch.py, so a guess never delays a read the
    running layer waits for). The subset of :class:`concurrent.futures.ThreadPoolExecutor`
    the engines use: :meth:`submit` returns a ``Future``, :meth:`shutdown`.

    Args:
        n: threads (reads in flight at once), at least 1.
        name: thread name prefix.
    """

    def __init__(self, n: int, name: str = "zipmoe-io"):
        import itertools
        import queue
        self._q = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}_{i}", daemon=True)
                         for i in range(int(n))]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args, priority: int = 0):
        """Queue ``fn(*args)``; returns its ``concurrent.futures.Future``."""
        from concurrent.futures import Future
        fut = Future()
        self._q.put((int(priority), next(self._seq), fut, fn, args))
        return fut

    def _loop(self):
        while True:
            _p, _s, fut, fn, args = self._q.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - kept in the future
                fut.set_exception(e)

    def shutdown(self, wait: bool = True):
        """Let the queued reads run, then stop the threads (joined with ``wait``)."""
        for _ in self._threads:
            self._q.put((1 << 30, next(self._seq), None, None, None))
        if wait:
            for t in self._threads:
                t.join()
