package overload

import (
	"slices"
	"time"
)

// waiter is one request waiting for a slot. Limiter.mu guards prio, the
// links and queued; shed and inFlight are written under it before ready
// is signalled and read by the waiter after it receives the signal.
type waiter struct {
	prio       int
	prev, next *waiter
	queued     bool

	shed     ShedReason // 0: admitted
	inFlight int        // when admitted

	ready chan struct{} // capacity 1
	timer *time.Timer   // the queue timeout, stopped while pooled
}

// queue holds the waiters: one FIFO list per priority, the lists ordered
// by priority, highest first. There are as many as distinct priorities
// waiting, a handful of tiers, so a scan finds a list faster than a map.
type queue struct {
	levels []level // none empty
	n      int
}

type level struct {
	prio       int
	head, tail *waiter
}

// front is the waiter to admit next: the oldest of the highest priority.
func (q *queue) front() *waiter {
	if len(q.levels) == 0 {
		return nil
	}
	return q.levels[0].head
}

// back is the waiter to evict first: the newest of the lowest priority.
func (q *queue) back() *waiter {
	if len(q.levels) == 0 {
		return nil
	}
	return q.levels[len(q.levels)-1].tail
}

func (q *queue) push(w *waiter) {
	i := 0
	for i < len(q.levels) && q.levels[i].prio > w.prio {
		i++
	}
	if i == len(q.levels) || q.levels[i].prio != w.prio {
		q.levels = slices.Insert(q.levels, i, level{prio: w.prio})
	}
	lv := &q.levels[i]
	w.prev, w.next, w.queued = lv.tail, nil, true
	if lv.tail != nil {
		lv.tail.next = w
	} else {
		lv.head = w
	}
	lv.tail = w
	q.n++
}

func (q *queue) remove(w *waiter) {
	i := 0
	for q.levels[i].prio != w.prio { // w is queued: its level exists
		i++
	}
	lv := &q.levels[i]
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		lv.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		lv.tail = w.prev
	}
	w.prev, w.next, w.queued = nil, nil, false
	q.n--
	if lv.head == nil {
		q.levels = slices.Delete(q.levels, i, i+1)
	}
}
