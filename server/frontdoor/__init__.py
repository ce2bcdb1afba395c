"""The front door: keys and client secrets, who may connect and how often, how long a
session may last, and the admin routes."""
