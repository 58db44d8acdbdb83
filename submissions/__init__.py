"""The leaderboard: tracks, run-log parsing, the verification rules, LEADERBOARD.md rendering."""
