"""Fixed groups: what a server learns over many rounds of masked sums, and why no more.

One round's masked sum tells the server the sum over the survivors S and nothing finer. Over many rounds it
tells more: sums over different survivor sets, subtracted, isolate one client. A server replayed one round's
model under two masking rounds with survivors {A, B, C, D} and {B, C, D} and read A's update (correlation
0.999998) and example count (exactly); with honest sampling alone, 12 rounds of 3 of 5 clients gave every
client's example count by least squares. Following So, Guler and Avestimehr ("Securing Secure Aggregation",
AAAI 2023), clients take part in fixed groups:

- the server puts each client, once in a session, in a group of ``secagg.group`` = g or more (``Groups.form``:
  g at a time, in the order the clients joined, a remainder under g joining the last group formed with it);
  a round holds whole groups only, and each round's configuration lists them (``RoundConfig.groups``, bound
  into every key the round derives, so nodes told different groups derive masks that never cancel); each group
  is a clique of the round's graph (``neighbour_graph`` adds its edges to a sparse graph), so every connected
  set of survivors, whose sum a server can unmask on its own, is whole groups;
- a node remembers every client's group as it first saw it in the session and refuses a round that says
  otherwise (``check_round``), refuses a round whose group for it is under its own floor (node config
  ``securemark-min-group``), and refuses to unmask unless the survivors are whole groups (``client_unmask``);
  one session per run (``securemark_mod``: a hello of another session or id is refused), so groups cannot be
  redrawn;
- the server sums only the groups whose every input arrived (``server_close_inputs``): a group with one node
  lost is dropped from that round whole.

**The bound.** Take a server that chooses every round's survivors and sampling (it may claim any dropouts)
and sends every node of a round the same model (each node's own fingerprinted copy of it) and configuration,
shows them one survivor list, and holds no keys of its own among them. Unmasking needs t reveals, from
survivors that each checked S to be whole groups of a configuration that agrees with their memory, and a set
of survivors that the graph splits is unmasked component by component, each of them whole groups (cliques); a
client's group is the same in every round it takes part in. So every sum the server can unmask is, round by
round, a sum of whole groups' sums, and no combination of sums over any number of rounds separates two clients
of one group: from honest rounds the server learns each group's summed updates and example counts, never a
client's own (the least-squares attack on counts gets group totals). Colluding nodes learn their own inputs:
a group of g holding c colluders exposes the sum of its other g - c clients, so g = 3 keeps one client behind
one colluder.

**What it does not bound.** The groups fix which inputs are summed, not what they hold, and each node trains
on what the server sends it alone: a server that sends a node's groupmates a model or configuration that
trains to no update (zero local epochs; a model whose units are all dead) makes the group's sum that node's
update and count (a review read both, correlation 0.9999, the count exactly). Under the malicious threat the
training configuration and weight metric are part of the signed round (``protocol.signing``: another one for
groupmates gives masks that never cancel), but the models are not: each node gets its own fingerprinted copy,
so nodes cannot compare them, and a model that trains to nothing still reads a node (not stopped). Nor does
anything outlive a node's state for the run: a node that restarts, or a new run, has forgotten its groups and
models.

**The cost.** A lost node costs its whole group for the round (``securemark simulate ... --set
secagg.dropout=0.1`` measures it; docs/explanations/masking.md has the table), and a round takes whole groups
of the nodes the inner strategy samples, so it can hold up to g - 1 more nodes than sampled. Clients that
joined late wait until g of them are without a group.
"""

from __future__ import annotations

from collections.abc import Iterable


class Groups:
    """The session's fixed groups of client ids (the server's side; nodes check them, ``check_round``)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a group size must be >= 1, got {size}")
        self.size = size
        self.of: dict[int, tuple[int, ...]] = {}  # client id -> its group (sorted)

    def form(self, ids: Iterable[int]) -> list[int]:
        """Group the clients among ``ids`` that have none, ``size`` at a time in the order given, the remainder
        joining the last group formed; fewer than ``size`` wait. Returns the clients still without a group."""
        new = list(dict.fromkeys(i for i in ids if i not in self.of))
        if len(new) < self.size:
            return new
        chunks = [new[k : k + self.size] for k in range(0, len(new) - self.size + 1, self.size)]
        chunks[-1] += new[len(chunks) * self.size :]
        for chunk in chunks:
            group = tuple(sorted(chunk))
            self.of.update({i: group for i in group})
        return []

    def of_round(self, ids: Iterable[int]) -> tuple[tuple[int, ...], ...]:
        """The groups of a round's clients (which must be whole groups), as ``RoundConfig.groups`` takes them."""
        ids = set(ids)
        groups = {self.of.get(i, (i,)) for i in ids}
        if {i for g in groups for i in g} != ids:
            raise ValueError("a round must hold whole groups")
        return tuple(sorted(groups))

    def whole(self, order: Iterable[int], available: set[int], want: int) -> list[int]:
        """Whole groups of the clients in ``order`` (the sampling order) whose every member is ``available``,
        taken until they hold ``want`` clients or more; clients without a group are left out."""
        out: list[int] = []
        for i in order:
            group = self.of.get(i)
            if len(out) >= want:
                break
            if group is not None and i not in out and set(group) <= available:
                out += group
        return sorted(out)
