module usmlab/goserver

go 1.19
