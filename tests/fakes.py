"""Batches as data.collate makes them, from random numbers: the model tests need no simulator."""
import torch


def fake_batch(vla, batch_size: int = 4, answers: bool = False, seed: int = 0) -> dict:
    """A batch as data.collate makes it, from random numbers and no simulator (openpi's fake
    data): images, right-padded prompts of different lengths, and either proprio + action
    chunks (the last step of row 0 padded) or, with answers=True, a labelled answer per row."""
    g = torch.Generator().manual_seed(seed)
    tok = vla.tokenizer
    letters = torch.tensor(tok("abcdefghijklmnopqrstuvwxyz ", add_special_tokens=False)["input_ids"])
    rows, labels = [], []
    for i in range(batch_size):  # prompts of 3, 5, 7, ... letters: every row but the last is padded
        prompt = [tok.bos_token_id] + vla.image_ids + letters[torch.randint(len(letters), (3 + 2 * i,), generator=g)].tolist()
        answer = letters[torch.randint(len(letters), (3,), generator=g)].tolist() + [tok.eos_token_id] if answers else []
        rows, labels = rows + [prompt + answer], labels + [[-100] * len(prompt) + answer]
    L = max(map(len, rows))
    batch = dict(input_ids=torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows]),
                 attention_mask=torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows]),
                 labels=torch.tensor([lb + [-100] * (L - len(lb)) for lb in labels]),
                 images=torch.randint(1, 255, (batch_size, vla.cfg.image_size, vla.cfg.image_size, 3), generator=g, dtype=torch.uint8))
    if not answers:
        batch.update(proprio=torch.randn(batch_size, vla.cfg.proprio_dim, generator=g),
                     actions=torch.randn(batch_size, vla.cfg.chunk, vla.cfg.action_dim, generator=g),
                     action_mask=torch.ones(batch_size, vla.cfg.chunk, dtype=torch.bool))
        batch["action_mask"][0, -1] = False
    return batch
