"""Greedy pair merging, the core both tokenizers share: SentencePiece-style (best score first) and GPT-2 BPE
(lowest merge rank first) differ only in the priority they give a pair.

`merge_pairs(ids, merges)` repeatedly merges the adjacent pair with the lowest priority, the leftmost one on ties,
until no adjacent pair is in `merges`. A negative id is a barrier: it merges with nothing (so its neighbours do not
become adjacent) and is left out of the result. Tokens live in a doubly linked list over their original positions;
positions only ever increase left to right, so the heap key (priority, left position) picks exactly the pair a
quadratic "scan for the best, leftmost pair" loop picks, in O(n log n).
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping

Merges = Mapping[tuple[int, int], tuple[float, int]]  # (left id, right id) -> (priority, merged id)


def merge_pairs(ids: list[int], merges: Merges) -> list[int]:
  """`ids` after merging adjacent pairs, lowest priority first (leftmost on ties), until none merges; negative
  ids (barriers) are dropped from the result.

  A heap entry is stale once either of its tokens changed; it then no longer equals the current pair.
  """
  n = len(ids)
  tokens = list(ids)  # tokens[i] == -1 once position i was merged into its left neighbour (or a barrier)
  prev = list(range(-1, n - 1))
  next_ = list(range(1, n + 1))  # n: no right neighbour

  def candidate(i: int) -> tuple[float, int, int, int, int] | None:
    """The heap entry (priority, i, left token, right token, merged token) of the pair starting at i, if any."""
    j = next_[i]
    hit = merges.get((tokens[i], tokens[j])) if j < n else None
    return None if hit is None else (hit[0], i, tokens[i], tokens[j], hit[1])

  heap = [entry for entry in map(candidate, range(n - 1)) if entry is not None]
  heapq.heapify(heap)
  while heap:
    _, i, left, right, merged = heapq.heappop(heap)
    j = next_[i]
    if tokens[i] != left or j >= n or tokens[j] != right:
      continue  # stale: a neighbour merged since this pair was pushed
    tokens[i], tokens[j] = merged, -1
    next_[i] = next_[j]
    if next_[j] < n:
      prev[next_[j]] = i
    for k in (prev[i], i):  # the two pairs the merged token now belongs to
      entry = candidate(k) if k >= 0 else None
      if entry is not None:
        heapq.heappush(heap, entry)
  return [t for t in tokens if t >= 0]
