"""`kvloom bench throughput` refuses length ranges it cannot draw from, naming the flag."""

from __future__ import annotations

import pytest

from kvloom.bench.throughput import main


@pytest.mark.parametrize(
    "argv,flag",
    [(["--prompt-len", "9", "5"], "--prompt-len"), (["--output-len", "0", "4"], "--output-len")],
)
def test_bad_length_range_is_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-n", "2", "--systems", "kvloom", *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
