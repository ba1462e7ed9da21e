"""CI's job API: the client (the reconciler's and verification's), and `verify = "ci-api"`,
CI confirming each event before its handlers run."""
