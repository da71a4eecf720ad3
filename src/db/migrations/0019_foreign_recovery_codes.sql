-- A set of recovery codes that came by import, made by another system: its codes are checked
-- as they were issued (any shape, case kept) besides Roster's own XXXX-XXXX-XXXX form.
ALTER TABLE authenticators ADD COLUMN foreign_codes boolean NOT NULL DEFAULT false;
