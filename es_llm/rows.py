"""The rows of one batched generate call over a whole population: which member each row is.

A population evaluated in one batched forward (`--noise_mode lowrank`, es_llm/lowrank.py;
`--es_params lora --lora_batch`, es_llm/lora.py) lays its rows out member-major: member 0's
prompts, then member 1's, ... Generation that drops finished rows mid-way (es_llm/generation.py)
tells the layout which rows remain; the rows it keeps stay in order, so each member's rows stay
one contiguous block.
"""
import torch


class RowLayout:
    """Which member each row of the batch belongs to, and per-layout tensors cached for the hooks.

    A fresh batch is member-major (rows = members x B): the first forward sets that layout. When
    generation drops rows that have finished, `select_rows(keep)` keeps those rows (indices into the
    current rows); `select_rows(None)` starts over for the next batch. What the hooks derive from
    the layout (`per_row`) is computed once per layout, not once per forward."""

    def __init__(self, members: int):
        self.members = members
        self.member_of_row = None  # [rows] member index, or None until the first forward
        self.pruned = False  # rows were dropped: the map no longer follows the member-major layout
        self.cache = {}

    def select_rows(self, keep) -> None:
        self.cache = {}
        if keep is None or self.member_of_row is None:
            self.member_of_row, self.pruned = None, False
        else:
            self.member_of_row = self.member_of_row[keep.to(self.member_of_row.device)]
            self.pruned = True

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The member of each row of `t` (rows along its first dimension)."""
        rows = t.shape[0]
        if self.member_of_row is not None and rows != len(self.member_of_row):
            if self.pruned:
                raise ValueError(f"a batched population forward got {rows} rows where the row map "
                                 f"has {len(self.member_of_row)}; call select_rows(None) before a "
                                 f"new batch")
            self.member_of_row, self.cache = None, {}  # a new member-major batch of another size
        if self.member_of_row is None:
            if rows % self.members:
                raise ValueError(f"a batched population forward needs rows = members x prompts; "
                                 f"got {rows} rows for {self.members} members")
            self.member_of_row = torch.arange(self.members, device=t.device).repeat_interleave(
                rows // self.members)
        return self.member_of_row

    def per_row(self, key, t: torch.Tensor, make):
        """make(member of each row), computed once per layout and kept under `key`."""
        rows = self.rows(t)
        if key not in self.cache:
            self.cache[key] = make(rows)
        return self.cache[key]

    def blocks(self, t: torch.Tensor) -> list:
        """(member, first row, end row) of each member that still has rows, in row order."""
        return self.per_row("blocks", t, member_blocks)


def member_blocks(member_of_row: torch.Tensor) -> list:
    """The contiguous block of rows of each member present, as (member, start, end)."""
    if len(member_of_row) > 1 and not bool((member_of_row[1:] >= member_of_row[:-1]).all()):
        raise ValueError("the rows of a batched population are out of member order")
    members, counts = torch.unique_consecutive(member_of_row, return_counts=True)
    blocks, start = [], 0
    for member, count in zip(members.tolist(), counts.tolist()):
        blocks.append((member, start, start + count))
        start += count
    return blocks


def padded_blocks(member_of_row: torch.Tensor, members: int) -> tuple:
    """The rows of each member present as one padded block, for one batched matmul over members:
    (members present [M], gather [M, longest] row indices, `rows` (one past the last row: a zero
    row appended) where a block is shorter, valid [M, longest] which entries are rows); or (None,
    None, None) when all `members` are present with blocks of one length (the rows need no
    gathering)."""
    blocks = member_blocks(member_of_row)
    rows, longest = len(member_of_row), max(end - start for _, start, end in blocks)
    if len(blocks) == members and longest * members == rows:
        return None, None, None
    present = torch.tensor([m for m, _, _ in blocks], device=member_of_row.device)
    gather = torch.full((len(blocks), longest), rows, device=member_of_row.device)
    for i, (_, start, end) in enumerate(blocks):
        gather[i, :end - start] = torch.arange(start, end, device=member_of_row.device)
    return present, gather, gather < rows
