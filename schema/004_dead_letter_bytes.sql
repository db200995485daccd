-- Dead letters keep what a text column cannot hold. `subject` stays readable
-- (invalid UTF-8 and NUL shown as U+FFFD); `subject_bytes` holds the subject
-- byte for byte when it differs from that text (NULL otherwise), so a retry
-- re-reads exactly the message that was refused. `subject_prefix` is the
-- subject prefix of the projector that kept the letter: a retry decodes with
-- it, whatever prefix the retrying command was given (NULL for letters kept
-- before this migration: those use the command's prefix).
ALTER TABLE projector_dead_letters
    ADD COLUMN subject_bytes bytea,
    ADD COLUMN subject_prefix text;
