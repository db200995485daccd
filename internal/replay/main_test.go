package replay_test

import (
	"testing"

	"github.com/buildstate/buildstate/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }
