//go:build !race

package limiter

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// A batch of sliding-window calls allocates the same whatever its size:
// its keys' bytes, go-redis' command and reply for its one script call,
// and go-redis' own per round trip; nothing per call. Under load (batches
// of ~16) that is under one allocation per decision.
func TestRedisBatchAllocationsDoNotGrowWithItsSize(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(patientClient(t, srv.Addr), "alloc")
	ctx := context.Background()
	rule := Rule{Limit: 1 << 30, Window: time.Minute}
	per := map[int]float64{}
	for _, size := range []int{1, 16, 128} {
		calls := make([]*call, size)
		for i := range calls {
			kind := callKind(i % 3) // decisions, leases and give-backs
			calls[i] = &call{key: fmt.Sprintf("client-%d", i), rule: rule, kind: kind, cost: 1 + i%4}
		}
		now := t0.UnixMilli()
		per[size] = testing.AllocsPerRun(50, func() {
			now++
			store.slidingBatch(ctx, calls, now)
			if calls[0].err != nil {
				t.Fatal(calls[0].err)
			}
		})
	}
	t.Logf("allocations per batch of 1, 16, 128 calls: %v", per)
	if per[128] > per[1]+1 || per[1] > 8 {
		t.Errorf("allocations per batch of 1, 16, 128 calls: %v; want at most 8, the same for every size", per)
	}
}
