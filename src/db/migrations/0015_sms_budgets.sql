-- A project's ceiling on SMS (--sms-per-hour, or the project's own): SMS_OTP challenges and
-- phone verifications of all its users together, the bill SMS pumping runs up through many
-- new accounts, which per-user rations cannot see. A budget of the ceiling that refills
-- evenly over an hour, taken under the row's lock in the issuing transaction (an issue that
-- does not commit takes nothing).
CREATE TABLE sms_budgets (
    project_id uuid PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    -- SMS issued and not yet refilled as of `at`.
    spent      double precision NOT NULL CHECK (spent >= 0),
    at         timestamptz NOT NULL
);

-- The project's own ceiling (NULL: the server's --sms-per-hour; 0: none).
ALTER TABLE projects ADD COLUMN sms_per_hour integer
    CHECK (sms_per_hour BETWEEN 0 AND 1000000);
