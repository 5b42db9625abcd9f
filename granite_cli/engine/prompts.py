"""The text side of a picture's prompt: the model's chat template, token ids that keep whatever
a user types as text, and the token arithmetic (image tokens, context window) that lets the
pipeline group batches and refuse what cannot fit before any model work."""

from __future__ import annotations

import math
from functools import lru_cache

from ..errors import UsageError


class Prompts:
    """Prompt building and token counting for one processor (its tokenizer and image grid)."""

    def __init__(self, processor, context_window: int | None, name: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.context_window = context_window
        """Most tokens (prompt and answer) the language model was built for."""
        self.name = name
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.special_texts = tuple(token.content for token in self.tokenizer.added_tokens_decoder.values())
        """Texts the tokenizer would read as control tokens: a question holding one is tokenized
        as plain text instead (see `ids`)."""
        # Memoised per instance, not per class: a class-level cache would keep every processor
        # it ever saw alive for the life of the process.
        self.text = lru_cache(maxsize=64)(self.text)
        self.ids = lru_cache(maxsize=64)(self.ids)
        self.image_tokens = lru_cache(maxsize=4096)(self.image_tokens)
        self.fit = lru_cache(maxsize=4096)(self.fit)

    def text(self, question: str) -> str:
        """The model's own chat template over a user turn holding the image and the question,
        exactly as the model card builds it."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def ids(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the chat-formatted prompt before and after its image.

        The whole prompt is tokenized as the processor would (so answers match the model
        card's, token for token). A question that holds the text of a control token (`<image>`,
        `<|end_of_text|>`, ...) is the exception: it is tokenized on its own as plain text and
        spliced between the template's parts, so what a user types is only ever text.
        """
        if not any(special in question for special in self.special_texts):
            ids = self.tokenizer(self.text(question))["input_ids"]
        else:
            marker = "\ue000"  # a private-use character: never in a chat template
            head, tail = self.text(marker).split(marker)
            ids = [
                *self.tokenizer(head)["input_ids"],
                *self.tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"],
                *self.tokenizer(tail, add_special_tokens=False)["input_ids"],
            ]
        if ids.count(self.image_token_id) != 1:
            raise UsageError(f"model {self.name!r}: its chat template does not place exactly one {self.image_token}")
        at = ids.index(self.image_token_id)
        return tuple(ids[:at]), tuple(ids[at + 1 :])

    def tokens(self, question: str, width: int, height: int) -> int:
        """Tokens of the model input for a picture of this size: template, question and image."""
        head, tail = self.ids(question)
        return len(head) + len(tail) + self.image_tokens(width, height)

    def check_fits(self, question: str, width: int, height: int, max_new_tokens: int) -> str | None:
        """Why an item cannot be answered within the model's context window, or None."""
        if self.context_window is None:
            return None
        return too_long(
            self.tokens(question, width, height), self.image_tokens(width, height), max_new_tokens, self.context_window
        )

    def image_tokens(self, width: int, height: int) -> int:
        """Image tokens the processor will emit for a picture of this size (used to group batches
        so that items of similar length share one, and little compute goes to padding)."""
        try:  # the processor's own count (vLLM asks processors the same way)
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            return int(data.num_image_tokens[0])
        except Exception:  # noqa: BLE001 - processors without the helper: area is a fair proxy
            return width * height // 196

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size the processor will shrink a picture of this size to (see `grid_fit`)."""
        return grid_fit(getattr(self.processor.image_processor, "image_grid_pinpoints", None), width, height)


def too_long(tokens: int, image_tokens: int, max_new_tokens: int, context_window: int) -> str | None:
    """Why a prompt of `tokens` (`image_tokens` of them the picture's) and an answer of
    `max_new_tokens` cannot fit the context window, or None."""
    if tokens + max_new_tokens <= context_window:
        return None
    return (
        f"prompt too long: {tokens:,} prompt tokens ({image_tokens:,} of them for the picture) + --max-new-tokens"
        f" {max_new_tokens} exceed the model's context of {context_window:,} tokens"
    )


def grid_fit(pinpoints, width: int, height: int) -> tuple[int, int]:
    """The size a LLaVA-NeXT processor with this tile grid (`image_grid_pinpoints`, [height,
    width] pairs) shrinks a picture of this size to (its best grid, aspect kept); a larger
    picture carries no detail the model sees. Used to render PDF pages at the resolution actually
    used instead of rendering large and shrinking, here and by a `--server` client (which has
    the server's grid, not its processor)."""
    if not pinpoints:
        return width, height
    grid_h, grid_w = select_best_resolution((height, width), pinpoints)
    scale_w, scale_h = grid_w / width, grid_h / height
    if min(scale_w, scale_h) >= 1:
        return width, height
    # As the processor resizes (get_patch_output_size): the limiting side becomes the grid's
    # exactly (scaling it by a float can round one pixel over), the other side follows.
    if scale_w < scale_h:
        return grid_w, min(math.ceil(height * scale_w), grid_h)
    return min(math.ceil(width * scale_h), grid_w), grid_h


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers' `image_processing_utils.select_best_resolution`, without importing it (a
    `--server` client loads no transformers): the grid that keeps the most of the picture's
    pixels, then wastes the fewest. A test holds the two equal."""
    height, width = size
    best, most, least_waste = None, 0, math.inf
    for grid_h, grid_w in pinpoints:
        scale = min(grid_w / width, grid_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_w * grid_h - kept
        if kept > most or (kept == most and waste < least_waste):
            best, most, least_waste = (grid_h, grid_w), kept, waste
    return best
