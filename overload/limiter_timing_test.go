package overload

import (
	"context"
	"testing"
	"time"
)

// BenchmarkAcquireDone is the fast path: admitted at once, released with
// a sample (a window closes every 1000 operations).
func BenchmarkAcquireDone(b *testing.B) {
	l := mustNew(b, DefaultSettings())
	ctx := context.Background()
	now := t0
	b.ReportAllocs()
	for b.Loop() {
		now = now.Add(time.Millisecond)
		tok, err := l.Acquire(ctx, 0)
		if err != nil {
			b.Fatal(err)
		}
		tok.Done(5*time.Millisecond, false, now)
	}
}

// BenchmarkAcquireDoneParallel is the fast path from every P at once,
// contending for the one mutex; the limit (MaxLimit) is never reached.
func BenchmarkAcquireDoneParallel(b *testing.B) {
	s := DefaultSettings()
	s.InitialLimit = s.MaxLimit
	l := mustNew(b, s)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		now := time.Now()
		for pb.Next() {
			tok, err := l.Acquire(ctx, 0)
			if err != nil {
				b.Error(err)
				return
			}
			now = now.Add(time.Microsecond)
			tok.Done(5*time.Millisecond, false, now)
		}
	})
}

// BenchmarkAcquireQueued is the slow path: 16 goroutines per P against a
// limit of 2, so most requests wait in the queue for a slot (a pooled
// waiter, its channel and timer), with the occasional timeout.
func BenchmarkAcquireQueued(b *testing.B) {
	l := mustNew(b, Settings{MinLimit: 2, MaxLimit: 2, InitialLimit: 2, QueueTimeout: 10 * time.Millisecond, QueueSize: 1000})
	ctx := context.Background()
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			tok, err := l.Acquire(ctx, 0)
			if err == nil {
				tok.Ignore()
			}
		}
	})
}
