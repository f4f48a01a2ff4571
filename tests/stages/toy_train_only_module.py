"""The toy image set with no readable test split: opening it raises (the recipe stage must never try)."""

from toy_student_module import ToyImages


def dataset(split="train"):
    if split != "train":
        raise RuntimeError(f"the {split!r} split was read")
    return ToyImages("train")
