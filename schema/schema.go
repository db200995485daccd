// Package schema embeds the read model's migrations (NNN_name.sql, applied in
// order by jackc/tern) and the event contract's JSON Schema.
package schema

import "embed"

// Migrations holds the *.sql files of this directory.
//
//go:embed *.sql
var Migrations embed.FS
