"""Every key the plugin reads or writes in a group's store, in one place.

The store (a ``torch.distributed.TCPStore`` the front end hosts) is the
group's shared memory: heartbeats, fault reports, the epoch (the fencing
token), each epoch's agreed membership and communicator rendezvous,
admissions of replacement ranks, and the fault-injection knobs. Keys are
spelled only here (a test checks that ``"eft/"`` appears in no other module),
so a reader finds the whole layout in one screen and a rename cannot leave a
stale spelling behind.

Layout (``<g>``: the group's name, e.g. ``dp`` for the workers, ``engine`` for
the engine cores' DP sync)::

    eft/<g>/epoch                      the group epoch (fencing token)
    eft/<g>/e<E>/hb/<rank>             heartbeat of group rank <rank> at epoch E
    eft/<g>/e<E>/fault/<rank>          FaultReport published by <rank> at epoch E
    eft/<g>/e<E>/join/<id>             stable id <id> registered for epoch E
    eft/<g>/e<E>/leader/<T>            the rank leading term T of the agreement
    eft/<g>/e<E>/members               agreed members + expert placement of E
    eft/<g>/e<E>/serving               the first step of E went through
    eft/<g>/e<E>/pg/...                E's communicator rendezvous (a PrefixStore)
    eft/<g>/e<E>/admission             E is an admission's planned fence (ticket)
    eft/<g>/e<E>/step/<id>             member <id>'s step number at admission E
    eft/<g>/admit/<ticket>/epoch       the epoch admission <ticket> happens at
    eft/<g>/admit/<ticket>/experts     experts the joiner of <ticket> brings
    eft/<g>/e<E>/failed                the group gave up at E (the reason)
    eft/<g>/join_request               a harness rank asking to join
    eft/<g>/join_ticket/<id>           that joiner's admission ticket
    eft/<g>/node_agent/<id>            the node agent that starts rank <id>'s replacements
    eft/<g>/replace/<id>               a start (or stop) request for rank <id>'s node agent
    eft/<g>/replace/<id>/<request>     that node agent's answer to request <request>
    eft/<g>/inject/slow/<rank>         fault injection: delay per guarded call
    eft/<g>/inject/rebuild_delay       fault injection: hold inside a rebuild
    eft/<g>/inject/rebuild_delay/<id>  the same, for rank <id> only
    eft/serve/rank<r>/completed        Ray Serve: requests rank r completed
    eft/serve/rank<r>/continued        Ray Serve: streams rank r continued elsewhere
    eft/serve/rank<r>/resent           Ray Serve: requests rank r sent again whole
    eft/serve/coordinator              Ray Serve: the gang's DP coordinator addresses
    eft/serve/admissions               Ray Serve: admissions posted (a counter)
    eft/serve/admission/<n>            Ray Serve: admission n (rank, ticket)
    eft/serve/admission/<n>/done/<r>   Ray Serve: rank r's part of admission n
"""

from __future__ import annotations

ROOT = "eft"


def epoch(group: str) -> str:
    return f"{ROOT}/{group}/epoch"


def epoch_prefix(group: str, epoch_: int) -> str:
    """Everything scoped to one epoch lives under this prefix."""
    return f"{ROOT}/{group}/e{epoch_}"


def heartbeat(group: str, epoch_: int, rank: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/hb/{rank}"


def fault_report(group: str, epoch_: int, rank: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/fault/{rank}"


def registered(group: str, epoch_: int, rank_id: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/join/{rank_id}"


def leader_term(group: str, epoch_: int, term: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/leader/{term}"


def members(group: str, epoch_: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/members"


def serving(group: str, epoch_: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/serving"


def communicator(group: str, epoch_: int) -> str:
    """Store prefix of epoch ``epoch_``'s communicator rendezvous."""
    return f"{epoch_prefix(group, epoch_)}/pg"


def admission(group: str, epoch_: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/admission"


def admission_step(group: str, epoch_: int, rank_id: int) -> str:
    return f"{epoch_prefix(group, epoch_)}/step/{rank_id}"


def admit_epoch(group: str, ticket: str) -> str:
    return f"{ROOT}/{group}/admit/{ticket}/epoch"


def admit_experts(group: str, ticket: str) -> str:
    return f"{ROOT}/{group}/admit/{ticket}/experts"


def join_request(group: str) -> str:
    return f"{ROOT}/{group}/join_request"


def node_agent(group: str, rank_id: int) -> str:
    return f"{ROOT}/{group}/node_agent/{rank_id}"


def replace_request(group: str, rank_id: int) -> str:
    return f"{ROOT}/{group}/replace/{rank_id}"


def replace_answer(group: str, rank_id: int, request_id: str) -> str:
    return f"{ROOT}/{group}/replace/{rank_id}/{request_id}"


def inject_slow(group: str, rank: int) -> str:
    return f"{ROOT}/{group}/inject/slow/{rank}"


def inject_rebuild_delay(group: str, rank_id: int | None = None) -> str:
    suffix = "" if rank_id is None else f"/{rank_id}"
    return f"{ROOT}/{group}/inject/rebuild_delay{suffix}"


def serve_completed(rank: int) -> str:
    return f"{ROOT}/serve/rank{rank}/completed"


def serve_continued(rank: int) -> str:
    """Streams this rank's replica continued elsewhere after its rank was lost."""
    return f"{ROOT}/serve/rank{rank}/continued"


def serve_resent(rank: int) -> str:
    """Requests this rank's replica sent again whole (nothing had reached the client)."""
    return f"{ROOT}/serve/rank{rank}/resent"


def serve_coordinator() -> str:
    """The addresses of the gang's vLLM DP coordinator (rank 0's replica runs it)."""
    return f"{ROOT}/serve/coordinator"


def serve_admissions() -> str:
    """How many admissions were posted (``store.add`` counter; admission n is 1-based)."""
    return f"{ROOT}/serve/admissions"


def serve_admission(number: int) -> str:
    return f"{ROOT}/serve/admission/{number}"


def serve_admission_done(number: int, rank: int) -> str:
    return f"{ROOT}/serve/admission/{number}/done/{rank}"


def failed(group: str, epoch_: int) -> str:
    """The group gave up at epoch ``epoch_`` (holds the reason): the orchestrator restarts it."""
    return f"{epoch_prefix(group, epoch_)}/failed"


def join_ticket(group: str, rank_id: int) -> str:
    """The admission ticket a harness joiner ``rank_id`` asks with."""
    return f"{ROOT}/{group}/join_ticket/{rank_id}"
