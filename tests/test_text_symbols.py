"""Symbol tables: sizes and ids equal GPT-SoVITS's (symbols.py / symbols2.py: sorted(set(...)),
then v2 appends "[", "]", sorted Korean and sorted Cantonese symbols)."""

import pytest

from fedvox.shared.errors import ConfigError
from fedvox.shared.text import phones_to_ids, symbol_to_id, symbols
from fedvox.shared.text.zh import pinyin_to_phones


def test_table_sizes():
    assert len(symbols("v1")) == 322
    assert len(symbols("v2")) == 732
    assert len(set(symbols("v2"))) == 732


def test_v2_extends_v1_so_shared_phones_keep_their_ids():
    assert symbols("v2")[:322] == symbols("v1")


@pytest.mark.parametrize(
    "symbol, expected_id",
    [
        ("!", 0),  # ASCII punctuation sorts first: ! , - . ?
        (",", 1),
        ("-", 2),
        (".", 3),
        ("?", 4),
        ("AA", 5),
        # "_" follows 5 punctuation marks and 90 upper-case symbols: AA EE OO, E1-5 En1-5,
        # I N U, SP SP2 SP3 UNK and the 71 ARPAbet symbols, N counted once
        ("_", 95),
        ("…", 321),  # U+2026 sorts after every ASCII symbol
    ],
)
def test_known_ids_in_both_versions(symbol, expected_id):
    assert symbol_to_id("v1")[symbol] == expected_id
    assert symbol_to_id("v2")[symbol] == expected_id


@pytest.mark.parametrize(
    "symbol, expected_id",
    [("[", 322), ("]", 323), ("ㄱ", 324), ("停", 351), ("空", 352), ("Ya", 353), ("Yz", 731)],
)
def test_known_v2_only_ids(symbol, expected_id):
    assert symbol_to_id("v2")[symbol] == expected_id
    assert symbol not in symbol_to_id("v1")


def test_every_pinyin_phone_is_in_the_v1_table():
    table = symbol_to_id("v1")
    for initial, final in pinyin_to_phones().values():
        assert initial in table
        for tone in "12345":
            assert final + tone in table


def test_phones_to_ids_and_errors():
    assert phones_to_ids(["n", "i2", ","], "v1") == [symbol_to_id("v1")[p] for p in ("n", "i2", ",")]
    with pytest.raises(ValueError, match="Ya"):
        phones_to_ids(["Ya"], "v1")
    with pytest.raises(ConfigError, match="symbols_version"):
        symbols("v3")
