"""Build a small CLIP-style BPE tokenizer folder whose vocabulary holds given words whole.

Tiny offline pipelines need a real tokenizer: with transformers 5, `CLIPTokenizer(vocab_file=...)`
silently ignores its files and maps every prompt to start/end/pad only. So we write the files a
CLIP checkpoint ships (vocab.json, merges.txt, configs) and load them with `from_pretrained`.

Layout follows CLIP: ids 0-255 are the byte-level base symbols, 256-511 the same with the
"</w>" end-of-word suffix, then one token per merge, then <|startoftext|> and <|endoftext|>.
Any ASCII text therefore stays encodable, and every given word becomes a single token.

Run `python -m distillery.models.tokenizer` to rebuild the shipped shapes tokenizer.

`complete_tokenizer_folder` makes a saved tokenizer folder load under both transformers majors:
transformers 5 saves only tokenizer.json and tokenizer_config.json, while the slow CLIPTokenizer
of transformers 4 (the class a diffusers pipeline's model_index.json names) reads vocab.json and
merges.txt.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77
SHAPES_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_tokenizer"

# CLIP's pre-tokenizer splits text into runs of letters, single digits and punctuation runs;
# only a run of letters can survive as one word, so that is all we accept.
_LETTERS = re.compile(r"[^\W\d_]+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:  # control chars, space, etc. move to code points above 255
            mapping[b] = chr(256 + extra)
            extra += 1
    # CLIP orders its base vocabulary with the printable bytes first.
    return {b: mapping[b] for b in keep + [b for b in range(256) if b not in keep]}


def _symbols(word: str) -> list[str]:
    """A word as byte-level symbols with the end-of-word suffix on the last one."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += EOW
    return chars


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every word is one symbol.

    Written out (rather than using tokenizers' BpeTrainer) so that ties are broken by a fixed
    rule, most frequent pair then lexicographically smallest, and the result is the same in
    every process.
    """
    segmented = [_symbols(w) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seg in segmented for pair in zip(seg, seg[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seg in enumerate(segmented):
            out, j = [], 0
            while j < len(seg):  # merge non-overlapping occurrences left to right, as BPE encodes
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    out.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    out.append(seg[j])
                    j += 1
            segmented[k] = out


def _normalise_words(words: Iterable[str]) -> list[str]:
    out = set()
    for word in words:
        w = str(word).lower()  # CLIP lowercases its input before BPE
        if not _LETTERS.fullmatch(w):
            raise ValueError(f"cannot make {word!r} a single CLIP token: only runs of letters survive CLIP's pre-tokenizer")
        out.add(w)
    if not out:
        raise ValueError("words is empty")
    return sorted(out)


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path) -> Path:
    """Write a CLIP tokenizer folder to `out_dir` in which every word of `words` is one token."""
    words = _normalise_words(words)
    merges = learn_merges(words)

    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*base, *(b + EOW for b in base), *("".join(m) for m in merges), BOS, EOS]:
        vocab.setdefault(token, len(vocab))  # two merges may spell the same token; keep the first id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    # a stale tokenizer.json from an earlier build would take precedence over vocab/merges
    (out / "tokenizer.json").unlink(missing_ok=True)

    _verify(out, words)
    return out


def _verify(folder: Path, words: list[str]) -> None:
    """Load the folder the way pipelines do and check that each word really is one token."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    split = {w: ids for w in words if len(ids := tok(w, add_special_tokens=False).input_ids) != 1}
    if split:
        raise RuntimeError(f"words not encoded as a single token: {split}")
    if len(tok) != len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))):
        raise RuntimeError(f"tokenizer loaded with {len(tok)} tokens, not the vocabulary written")


# Written by transformers 5 about the session that loaded the tokenizer, not about the tokenizer.
_SESSION_KEYS = ("is_local", "local_files_only", "name_or_path")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def complete_tokenizer_folder(tokenizer, folder: str | Path) -> Path:
    """Add to a folder that ``tokenizer.save_pretrained`` wrote the files transformers 4 reads:
    vocab.json and merges.txt (from the tokenizer's BPE model), special_tokens_map.json, and a
    tokenizer_config.json that names the class, the maximum length and the special tokens."""
    folder = Path(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        backend.model.save(str(folder))  # vocab.json + merges.txt, as CLIP checkpoints ship them
        # A special token added outside the BPE vocabulary still needs its id in vocab.json.
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        added = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.content not in vocab}
        if added:
            vocab.update(added)
            (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    elif not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise ValueError(f"cannot write vocab.json/merges.txt for a {type(tokenizer).__name__} "
                         f"(backend model {type(backend.model).__name__ if backend else None}); expected a CLIP BPE tokenizer")

    specials = {k: str(getattr(tokenizer, k)) for k in SPECIAL_TOKEN_KEYS if getattr(tokenizer, k, None) is not None}
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = {k: v for k, v in config.items() if k not in _SESSION_KEYS}
    config.setdefault("tokenizer_class", type(tokenizer).__name__.removesuffix("Fast"))
    config["model_max_length"] = int(tokenizer.model_max_length)
    config.update(specials)
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return folder


def complete_pipeline_tokenizers(pipe, folder: str | Path) -> list[Path]:
    """``complete_tokenizer_folder`` for every tokenizer of a pipeline saved to ``folder``
    (tokenizer, and tokenizer_2 for SDXL)."""
    return [complete_tokenizer_folder(tok, Path(folder) / name)
            for name, tok in pipe.components.items() if name.startswith("tokenizer") and tok is not None]


def main() -> None:
    from distillery.data.shapes import caption_vocabulary

    out = build_clip_tokenizer(caption_vocabulary(), SHAPES_TOKENIZER_DIR)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
