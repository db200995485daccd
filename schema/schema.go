// Package schema embeds the read model's migrations (NNN_name.sql, applied in
// order by jackc/tern) and the event contract's JSON Schema.
package schema

import "embed"

// Migrations holds the *.sql files of this directory.
//
//go:embed *.sql
var Migrations embed.FS

// EventV1 is the JSON Schema (2020-12) of an event body, spec version 1.
//
//go:embed event.v1.schema.json
var EventV1 []byte
