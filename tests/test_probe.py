"""kit/probe.py: what the target says about itself before a run. The SSL functions the built-in
tracer probes are read from libssl's ELF dynamic symbols, not from `bpftrace -l` (a root
process start): both must name the same functions."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from labrun import needs_tracer

from usmlab.kit import probe
from usmlab.targets.local import LocalTarget
from usmlab.tracers.builtin import SSL_FUNCTIONS, exported_functions


def libssl() -> str:
    libraries = probe.mapped_libraries()  # this process imported ssl (hypothesis, pytest)
    if not libraries:
        import ssl  # noqa: F401 - maps libssl into this process

        libraries = probe.mapped_libraries()
    assert libraries, "python3's ssl module maps no libssl"
    return libraries[0]


@needs_tracer
def test_elf_reading_finds_what_bpftrace_lists() -> None:
    library = libssl()
    from_elf = probe.elf_functions(library)
    assert from_elf is not None
    assert [f for f in SSL_FUNCTIONS if f in from_elf] == exported_functions(LocalTarget(), library)
    assert {"SSL_write", "SSL_read"} <= set(from_elf)  # OpenSSL 1.1 and 3 export both


def test_a_file_that_is_not_elf_or_is_cut_short_is_none(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a library\n")
    assert probe.elf_functions(str(text)) is None
    cut = tmp_path / "libssl-cut.so"
    cut.write_bytes(Path(libssl()).read_bytes()[:4096])
    assert probe.elf_functions(str(cut)) is None
    assert probe.elf_functions(str(tmp_path / "missing.so")) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.sampled_from([b"\x7fELF\x02\x01", b"\x7fELF\x01\x02"]))
def test_arbitrary_bytes_behind_an_elf_header_never_raise(body: bytes, head: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".so") as handle:
        handle.write(head + body)
        handle.flush()
        found = probe.elf_functions(handle.name)
    assert found is None or isinstance(found, list)
