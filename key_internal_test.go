package pglocks

import "testing"

func TestHashVectors(t *testing.T) {
	tests := []struct {
		name string
		want int64
	}{
		{"some lock", 1837249113968243424},
		{"", -6939563903564495251},
		{"héllo wörld 🔒", -3166781526316548859},
		{"abcdefghijkl", -7556637188122330412},
	}
	for _, tt := range tests {
		if got := int64(hashBytesExtended(tt.name)); got != tt.want {
			t.Errorf("hashBytesExtended(%q) = %d, want %d", tt.name, got, tt.want)
		}
	}
}
