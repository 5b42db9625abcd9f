"""Constrained decoding for --schema / --json-object: xgrammar matchers, one per row of a batch."""

from __future__ import annotations


def compile_schema(tokenizer_info, schema_text: str):
    """The schema compiled against a vocabulary, whitespace-free."""
    import xgrammar

    from ..schema import SEPARATORS

    compiler = xgrammar.GrammarCompiler(tokenizer_info)
    return compiler.compile_json_schema(schema_text, any_whitespace=False, separators=SEPARATORS)


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: set[int]):
    """What xgrammar needs of the tokenizer; `vocab_size` is the logits' width, which can exceed
    the tokenizer's own."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))


class GrammarMask:
    """A `generate` logits processor holding one xgrammar matcher per row of the batch.

    Each step: the rows still inside their grammar accept the token they just produced, their
    allowed-token bitmasks are filled in one multi-threaded call, and the masks are applied to
    the logits in place (`apply_bitmask`). Rows whose JSON is complete end with the end-of-text
    token, which the grammar then only allows.
    """

    def __init__(self, compiled, rows: int):
        import xgrammar

        self.xgrammar = xgrammar
        self.matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        self.batch = xgrammar.BatchGrammarMatcher()
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(rows, self.vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        live = [i for i, matcher in enumerate(self.matchers) if not matcher.is_terminated()]
        if self.started and live:
            last = input_ids[:, -1].tolist()
            self.xgrammar.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[i] for i in live], [last[i] for i in live]
            )
            live = [i for i in live if not self.matchers[i].is_terminated()]
        self.started = True
        if not live:
            return scores
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, indices=live)
        apply_bitmask(scores, self.bitmask.to(scores.device, non_blocking=True), self.vocab_size, live)
        return scores


def apply_bitmask(scores, bitmask, vocab_size: int, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of every token a row's bitmask forbids (bit i of word
    j allows token 32 j + i), and of every logit beyond the vocabulary.

    Plain tensor operations on the logits' own device: xgrammar's fused kernels need Triton or
    nvcc, and a C compiler on the host at first use, and Triton reads the properties of GPU 0
    whatever the device; this needs nothing and takes microseconds against a decode step.
    """
    import torch

    index = torch.tensor(rows, device=scores.device)
    shifts = torch.arange(32, device=scores.device, dtype=torch.int32)
    words = bitmask.index_select(0, index).to(torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
    if allowed.shape[1] < vocab_size:  # (a vocabulary that is not a multiple of 32 is padded)
        raise ValueError(f"bitmask covers {allowed.shape[1]} tokens, vocabulary has {vocab_size}")
    selected = scores.index_select(0, index)
    selected[:, :vocab_size].masked_fill_(~allowed, float("-inf"))
    selected[:, vocab_size:] = float("-inf")
    scores.index_copy_(0, index, selected)
