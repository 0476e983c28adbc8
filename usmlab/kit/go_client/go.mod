module usmlab/goclient

go 1.19
