"""Fair sharing of the runners' slots: between users, between a user's scans, by priority, without
starving anyone; the policy alone, then through `services.claim_pages` on the real database."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from scans import services
from scans.models import Page, Scan, Worker
from scans.scheduling import Candidate, allocate

T0 = datetime(2026, 1, 1)


def scan(scan_id: int, owner: int, *, pending: int, running: int = 0, priority: int = 0, age: int = 0, cap=None) -> Candidate:
    return Candidate(scan_id, owner, priority, T0 + timedelta(seconds=age), pending, running, cap)


def test_a_new_users_scan_gets_the_next_slot_behind_a_big_one():
    big = scan(1, owner=1, pending=2000, running=8)
    small = scan(2, owner=2, pending=1, age=10)
    assert allocate(1, [big, small], {1: 8}) == {2: 1}


def test_users_share_equally_whatever_the_number_of_their_scans():
    many = [scan(i, owner=1, pending=100, age=i) for i in range(1, 6)]
    one = scan(9, owner=2, pending=100, age=9)
    granted = allocate(10, [*many, one], {})
    by_owner = Counter()
    for scan_id, count in granted.items():
        by_owner[1 if scan_id < 9 else 2] += count
    assert by_owner == {1: 5, 2: 5}
    assert all(granted[i] == 1 for i in range(1, 6))  # and user 1's share is spread over its scans


def test_priority_weighs_four_times_per_level_and_starves_no_one():
    high = scan(1, owner=1, pending=100, priority=1)
    normal = scan(2, owner=1, pending=100, age=1)
    assert allocate(10, [high, normal], {}) == {1: 8, 2: 2}
    urgent = scan(3, owner=2, pending=100, priority=2)
    low = scan(4, owner=3, pending=100, priority=-1)
    granted = allocate(40, [urgent, low], {})
    assert granted[3] > granted[4] >= 1


def test_older_scans_first_among_equals_and_caps_are_kept():
    older, newer = scan(1, owner=1, pending=5, age=0, cap=1), scan(2, owner=1, pending=5, age=5)
    assert allocate(1, [newer, older], {}) == {1: 1}
    assert allocate(4, [newer, older], {}) == {1: 1, 2: 3}  # the capped scan takes one slot only


def test_cpu_scans_share_the_cpu_room_and_the_other_scans_take_the_rest():
    cpu_a = Candidate(1, 1, 0, T0, 50, 0, cpu=True)
    cpu_b = Candidate(2, 2, 0, T0 + timedelta(seconds=1), 50, 0, cpu=True)
    vllm = Candidate(3, 3, 0, T0 + timedelta(seconds=2), 50, 0)
    granted = allocate(12, [cpu_a, cpu_b, vllm], {}, cpu_slots=4)
    assert granted == {1: 2, 2: 2, 3: 8}  # fair among the CPU scans, the rest to the other one
    assert allocate(12, [cpu_a, vllm], {}, cpu_slots=0) == {3: 12}
    assert allocate(12, [cpu_a], {}, cpu_slots=0) == {}
    assert allocate(3, [cpu_a], {}) == {1: 3}  # no CPU room given: no limit


def test_no_more_than_is_waiting():
    assert allocate(10, [scan(1, owner=1, pending=2)], {}) == {1: 2}
    assert allocate(10, [], {}) == {}


@pytest.mark.django_db
def test_claims_on_the_database_share_slots_and_resume_fairly(tmp_path):
    users = get_user_model()
    alice, bob = users.objects.create_user("alice"), users.objects.create_user("bob")

    def queued(owner, pages: int, **fields) -> Scan:
        row = Scan.objects.create(owner=owner, file="x.pdf", original_filename="x.pdf", content_type="application/pdf",
                                  size=1, sha256="0" * 64, page_count=pages, **fields)
        services.create_pages(row)
        return row

    big = queued(alice, 50)
    first = services.claim_pages(worker_id="w1", slots=4)
    assert [(c.page.scan_id, c.page.number) for c in first] == [(big.pk, n) for n in (1, 2, 3, 4)]
    assert first[0].scan_status_changed and Scan.objects.get(pk=big.pk).status == Scan.Status.PROCESSING

    small = queued(bob, 2)
    urgent = queued(alice, 3, priority=Scan.Priority.URGENT)
    # Bob has nothing in flight: his scan gets the first free slot. Alice's urgent scan (weight 16) then
    # outweighs Bob's one page in flight, and leads her own big scan.
    claimed = services.claim_pages(worker_id="w2", slots=3)
    assert [(c.page.scan_id, c.page.number) for c in claimed] == [(small.pk, 1), (urgent.pk, 1), (urgent.pk, 2)]
    assert Page.objects.filter(status=Page.Status.RUNNING).count() == 7
    assert set(Page.objects.filter(scan=small, status=Page.Status.RUNNING).values_list("worker_id", flat=True)) == {"w2"}

    # w1 dies: its pages come back, and only its pages.
    services.heartbeat_worker(worker_id="w2")
    Worker.objects.create(worker_id="w1", heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert services.recover_stale_workers(stale_after=timedelta(seconds=30)) == [big.pk]
    assert Page.objects.filter(scan=big, status=Page.Status.PENDING).count() == 50
    assert Scan.objects.get(pk=big.pk).status == Scan.Status.QUEUED  # nothing of it is out any more
    assert Page.objects.filter(status=Page.Status.RUNNING, worker_id="w2").count() == 3


@pytest.mark.django_db
def test_claims_give_cpu_scans_at_most_the_cpu_room_and_say_which_pages_they_are():
    owner = get_user_model().objects.create_user("carol")

    def queued(pages: int, options: dict) -> Scan:
        row = Scan.objects.create(owner=owner, file="x.pdf", original_filename="x.pdf", content_type="application/pdf",
                                  size=1, sha256="0" * 64, page_count=pages, options=options)
        services.create_pages(row)
        return row

    cpu = queued(20, {"engine": "tesseract"})
    vllm = queued(20, {"engine": "vllm"})
    claims = services.claim_pages(
        worker_id="w1", slots=10, cpu_slots=3, is_cpu_scan=lambda options: options.get("engine") != "vllm"
    )
    by_scan = Counter(claim.page.scan_id for claim in claims)
    assert by_scan == {cpu.pk: 3, vllm.pk: 7}
    assert {claim.page.scan_id for claim in claims if claim.cpu} == {cpu.pk}
    # Without the predicate nothing counts as CPU work (the claim as before).
    assert {claim.cpu for claim in services.claim_pages(worker_id="w1", slots=4, cpu_slots=0)} == {False}
