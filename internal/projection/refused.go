package projection

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
)

// Refused reports whether err is the database refusing what a batch
// carries, so that writing the same messages again can never succeed:
// SQLSTATE class 22 (data exception: a value a column cannot hold), 54
// (program limit: a value too large) and P0 (an exception a trigger or
// function raises, as a rule on the content). The store isolates the
// messages responsible and keeps them as dead letters.
//
// Every other error is the database's state, not the message's, and is
// waited out: connection loss and class 08, serialization failures and
// deadlocks (40001, 40P01), shutdowns (57P01-57P03), insufficient resources
// (class 53), the seed's constraints (class 23: the rules never break them,
// so a violation is a race or a broken database, retried and then
// redelivered, never dropped) and errors an operator fixes (class 42, a
// missing table or a revoked privilege). Dead-lettering every message
// behind such an error would empty the log into the dead letters for
// nothing.
func Refused(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || len(pgErr.Code) != 5 {
		return false
	}
	switch pgErr.Code[:2] {
	case "22", "54", "P0":
		return true
	}
	return false
}
