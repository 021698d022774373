"""Data files of the text frontend (symbol tables, pinyin mapping, word lists); see README.md."""
