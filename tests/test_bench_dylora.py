"""``moracl bench dylora``'s options: bad values stop argparse with the value named, and the
defaults."""

from __future__ import annotations

import pytest

from moracl.bench import dylora


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lrs", "0"], "'0'"),
        (["--lrs=-2e-3"], "'-2e-3'"),
        (["--lrs", "nan"], "'nan'"),
        (["--alpha", "x"], "'x'"),
        (["--updates", "first"], "'first'"),
        (["--ranks", "16"], "[16] exceed --rank 8"),
    ],
)
def test_bad_options_name_the_value(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        dylora.parse_args(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_the_defaults_parse() -> None:
    args = dylora.parse_args([])
    assert args.lrs == [2e-3] and args.updates == ["last", "all"] and args.seeds == [0]
