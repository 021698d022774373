"""Korean: GPT-SoVITS's korean.py phones, checked against upstream's own output.

The expected phones were produced by running GPT-SoVITS's ``text/korean.py`` ``g2p`` (commit
48b1a01, then ``clean_text``'s UNK mapping and ``cleaned_text_to_sequence`` for the ids) in a
scratch folder with g2pk2 0.0.3, jamo 0.4.1, python-mecab-ko 1.3.7 and python-mecab-ko-dic
2.1.1.post2, the versions the ``ko`` extra installs. Each phone is one character, so a phone
list is written as a string.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedvox.shared.errors import TextError
from fedvox.shared.text import phonemize
from fedvox.shared.text.ko import latin_to_hangul

pytest.importorskip("g2pk2")
pytest.importorskip("mecab")


@pytest.mark.parametrize(
    ("text", "phones"),
    [
        # ㄴ+ㅕ -> ㄴ ㅣㅓ (compound vowels split); a text ending in a jamo gets a final "."
        ("안녕하세요", "ㅇㅏㄴㄴㅣㅓㅇㅎㅏㅅㅔㅇㅣㅗ."),
        # a space is 空; ㅂ+ㅅ tensed (반갑습니다 -> 반갑씀니다: ㅂ before ㄴ nasalised to ㅁ)
        (
            "안녕하세요, 만나서 반갑습니다!",
            "ㅇㅏㄴㄴㅣㅓㅇㅎㅏㅅㅔㅇㅣㅗ,空ㅁㅏㄴㄴㅏㅅㅓ空ㅂㅏㄴㄱㅏㅂㅆㅡㅁㄴㅣㄷㅏ!",
        ),
        # nasalisation (국물 -> 궁물), liaison (맛있어요 -> 마시써요)
        ("국물이 정말 맛있어요.", "ㄱㅜㅇㅁㅜㄹㅣ空ㅈㅓㅇㅁㅏㄹ空ㅁㅏㅅㅣㅆㅓㅇㅣㅗ."),
        # palatalisation (같이 -> 가치)
        ("같이 가요?", "ㄱㅏㅊㅣ空ㄱㅏㅇㅣㅗ?"),
        # native numerals before classifiers (3개 -> 세개), Sino-Korean ones for dates (2024년 -> 이천이십사년)
        ("사과 3개를 샀어요.", "ㅅㅏㄱㅗㅏ空ㅅㅔㄱㅐㄹㅡㄹ空ㅅㅏㅆㅓㅇㅣㅗ."),
        (
            "2024년 3월 15일에 만나요.",
            "ㅇㅣㅊㅓㄴㅣㅅㅣㅂㅆㅏㄴㅣㅓㄴ空ㅅㅏㅁㅜㅓㄹ空ㅅㅣㅂㅗㅇㅣㄹㅔ空ㅁㅏㄴㄴㅏㅇㅣㅗ.",
        ),
        # Latin letters are spelled before g2pk2 (mp3 -> 엠피3 -> 엠피삼); full-width marks mapped
        ("mp3 파일을 다운받고 있어요.", "ㅇㅔㅁㅍㅣㅅㅏㅁ空ㅍㅏㅇㅣㄹㅡㄹ空ㄷㅏㅇㅜㄴㅂㅏㄷㄲㅗ空ㅇㅣㅆㅓㅇㅣㅗ."),
        ("USB를 꽂아 주세요。", "ㅇㅣㅜㅇㅔㅅㅡㅂㅣㄹㅡㄹ空ㄲㅗㅈㅏ空ㅈㅜㅅㅔㅇㅣㅗ."),
        ("의사의 희망은 무엇인가요？", "ㅇㅡㅣㅅㅏㅇㅡㅣ空ㅎㅣㅁㅏㅇㅇㅡㄴ空ㅁㅜㅇㅓㅅㅣㄴㄱㅏㅇㅣㅗ?"),
        # g2pk2 gives 무를 러어요; upstream's fix puts the ㄴ back after 을/를 + space
        ("물을 넣어요", "ㅁㅜㄹㅡㄹ空ㄴㅓㅇㅓㅇㅣㅗ."),
        ("노래를 너무 좋아해요", "ㄴㅗㄹㅐㄹㅡㄹ空ㄴㅓㅁㅜ空ㅈㅗㅇㅏㅎㅐㅇㅣㅗ."),
        # lateralisation inside a word (신라 -> 실라)
        ("신라 시대의 역사", "ㅅㅣㄹㄹㅏ空ㅅㅣㄷㅐㅇㅡㅣ空ㅇㅣㅓㄱㅆㅏ."),
        # characters outside the table (Chinese, @) are 停
        ("한국어，中文 그리고 @ 기호", "ㅎㅏㄴㄱㅜㄱㅓ,停停空ㄱㅡㄹㅣㄱㅗ空停空ㄱㅣㅎㅗ."),
        ("값이 너무 비싸요", "ㄱㅏㅂㅆㅣ空ㄴㅓㅁㅜ空ㅂㅣㅆㅏㅇㅣㅗ."),
    ],
)
def test_upstream_phones(text: str, phones: str) -> None:
    result = phonemize(text, "ko")
    assert result.phones == list(phones)
    assert (result.word2ph, result.norm_text, result.language) == (None, text, "ko")


def test_upstream_ids() -> None:
    # cleaned_text_to_sequence(g2p("안녕하세요"), "v2") as upstream printed it
    assert phonemize("안녕하세요", "KO").ids == [
        335,
        343,
        326,
        326,
        350,
        345,
        335,
        342,
        343,
        333,
        346,
        335,
        350,
        347,
        3,
    ]


def test_latin_letters_fold_as_upstreams_case_insensitive_match() -> None:
    assert latin_to_hangul("Kim, TV!") == "케이아이엠, 티브이!"
    # Python's case-insensitive [a-z] also takes the Kelvin sign and the long s
    assert latin_to_hangul("\u212a\u017f") == "케이에스"


def test_v1_and_nothing_to_say() -> None:
    with pytest.raises(TextError, match="v2 symbol table only") as caught:
        phonemize("안녕", "ko", "v1")
    assert caught.value.reason == "unsupported_language"
    with pytest.raises(TextError) as caught:
        phonemize("!! @", "ko")
    assert caught.value.reason == "unphonemizable_text"


def test_loading_downloads_nothing() -> None:
    # g2pk2 calls nltk.download("cmudict") at import when NLTK has no CMUdict: it must not here
    script = (
        "import nltk\n"
        "def refuse(*args, **kwargs): raise AssertionError('nltk.download called')\n"
        "nltk.download = refuse\n"
        "from fedvox.shared.text import phonemize\n"
        "assert phonemize('물을 넣어요', 'ko').phones[-1] == '.'\n"
        "assert not any('fedvox-cmudict' in p for p in nltk.data.path)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
