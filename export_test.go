package tasking

// Exported for the external tests only (this file is compiled into tests).

// LockAppName is the application_name of a worker's PostgreSQL lock
// connection, which tests use to find and kill exactly that connection.
var LockAppName = lockAppName
