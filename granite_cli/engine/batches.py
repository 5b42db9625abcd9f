"""The CPU side of a batch: pictures tiled and normalised by the model's processor, prompts
tokenized (see `prompts.Prompts.ids`), both joined into left-padded tensors for `generate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from .prompts import Prompts


def prepare(processor, prompts: Prompts, images: list[Image.Image], questions: list[str], pad_id: int, device=None):
    """The model inputs of a batch.

    The processor sees only the image token as text: it tiles the pictures and expands that
    token into each picture's image tokens, which are spliced into the prompt's own token ids,
    left-padded as batched generation needs. `device`: where the torchvision image processor
    resizes (the GPU, when the model is there). Safe to run on a worker thread.
    """
    import torch

    # A picture asked several questions (the same object in several rows) is tiled and encoded
    # once: `image_rows` says which of the pictures each row reads (see `Generator.encode`).
    first: dict[int, int] = {}
    image_rows = [first.setdefault(id(image), len(first)) for image in images]
    unique = list({id(image): image for image in images}.values())
    inputs = processor(
        images=unique,
        text=[prompts.image_token] * len(unique),
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        **({"device": str(device)} if device is not None else {}),
    )
    rows = []
    for question, picture in zip(questions, image_rows, strict=True):
        head, tail = prompts.ids(question)
        expansion = inputs["input_ids"][picture][inputs["attention_mask"][picture].bool()].tolist()
        rows.append([*head, *expansion, *tail])
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    inputs["input_ids"], inputs["attention_mask"] = input_ids, attention_mask
    inputs["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
    return inputs
